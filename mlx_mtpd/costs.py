"""What the planner knows before its first step: step costs measured once per
device, model and head set (kept in the cache folder), and a head set's own
measured acceptance by draft position (its `eval.json`).

`auto` weighs every draft against plain decoding by measured step times
(docs/DESIGN.md, "The planner").  A planner that starts from nothing spends the
first answer of a process timing plain bursts; one seeded here drafts from its
first step when drafting pays, and its own measurements then correct the seed.

The cost file's name is a hash of everything that changes a step's time: the
device and its BLAS, MLX's version, the model (architecture, sizes, weight
dtypes and quantization, its fingerprint) and the head set (its config); any
change means another file, measured again on first use or by `mlx_mtpd doctor`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .files import EVAL_FILE, home, write_json_atomic

COSTS_VERSION = 2  # 2: tree steps by size
COSTS_DIR = "step_costs"
HEAD_DEPTHS = (1, 2, 3, 4)
LOOKUP_LENGTHS = (2, 4, 8, 16, 32)
TREE_SIZES = (3, 4, 5, 6, 8, 10, 12, 16)  # nodes of a tree step (t_n included)
# A typical chat request: the costs are measured at the context length of a chat's first answer.
CALIBRATION_PROMPT = (
    "I am planning a small vegetable garden behind my house this spring. The soil is a bit sandy and the "
    "spot gets sun in the morning only. Which vegetables would grow well there, and how should I prepare "
    "the beds before planting? Please keep it practical."
)


def _device() -> Dict[str, Any]:
    info: Dict[str, Any] = {"device": str(mx.default_device()), "machine": platform.machine(),
                            "system": platform.system(), "cpus": os.cpu_count(), "mlx": mx.__version__}
    try:
        info["name"] = mx.device_info().get("device_name")
    except Exception:  # older MLX, or a backend without it
        pass
    from . import blas

    info["blas"] = blas.describe()
    return info


def _model_key(model: nn.Module) -> Dict[str, Any]:
    params = tree_flatten(model.parameters())
    args = getattr(model, "args", None)
    fields = {k: v for k, v in sorted(vars(args).items()) if isinstance(v, (int, float, str, bool))} if args else {}
    return {
        "class": f"{type(model).__module__}.{type(model).__name__}",
        "args": fields,
        "params": sum(int(v.size) for _, v in params),
        "dtypes": sorted({str(v.dtype) for _, v in params}),
        "quantized": sorted({k.rsplit(".", 1)[0] for k, _ in params if k.endswith(".scales")})[:4],
        "probe": _probe(params),
    }


def _probe(params) -> List[float]:
    """A few numbers that tell two trained models of the same shape apart."""
    out = []
    for _, v in params[:3]:
        flat = v.reshape(-1)[:256]
        out.append(round(float(mx.abs(flat.astype(mx.float32)).sum()), 3))
    return out


def _heads_key(head_set) -> Optional[Dict[str, Any]]:
    if head_set is None:
        return None
    cfg = {k: v for k, v in head_set.config.items() if k not in ("training",)}
    return {"config": json.loads(json.dumps(cfg, default=str)), "num_heads": head_set.num_heads}


def cost_key(model: nn.Module, head_set=None) -> Dict[str, Any]:
    return {"version": COSTS_VERSION, "device": _device(), "model": _model_key(model), "heads": _heads_key(head_set)}


def cost_path(key: Dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return home() / COSTS_DIR / f"{digest}.json"


def load_costs(model: nn.Module, head_set=None, key: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
    """The step costs measured earlier for this device, model and head set, if any
    (`key`: their cost_key, when already computed)."""
    key = key or cost_key(model, head_set)
    path = cost_path(key)
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if rec.get("key") != json.loads(json.dumps(key, sort_keys=True)):
        return None  # a hash collision or a file from elsewhere: measure again
    return rec.get("costs")


def step_costs(model: nn.Module, tokenizer, head_set=None, *, measure: bool = True, quiet: bool = False,
               force: bool = False) -> Optional[Dict[str, Any]]:
    """The cached step costs, measured now (and kept) when there are none and `measure`."""
    key = cost_key(model, head_set)
    if not force:
        costs = load_costs(model, head_set, key)
        if costs is not None or not measure:
            return costs
    if not quiet:
        print("[mlx_mtpd] measuring step costs on this device (once per model and head set)...",
              file=sys.stderr, flush=True)
    tic = time.perf_counter()
    costs = measure_costs(model, prompt_ids(tokenizer), head_set)
    costs["seconds_to_measure"] = round(time.perf_counter() - tic, 2)
    path = cost_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"key": key, "costs": costs,
                                 "measured": time.strftime("%Y-%m-%dT%H:%M:%S")})
    except OSError as e:  # a read-only cache folder: use them for this process only
        if not quiet:
            print(f"[mlx_mtpd] could not keep the step costs in {path.parent} ({e})", file=sys.stderr)
    return costs


def prompt_ids(tokenizer) -> List[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": CALIBRATION_PROMPT}],
                                            add_generation_prompt=True)
        if not isinstance(ids, str):
            return list(ids)
    return list(tokenizer.encode(CALIBRATION_PROMPT))


def measure_costs(model: nn.Module, prompt: List[int], head_set=None, *, repeats: int = 5,
                  head_depths=HEAD_DEPTHS, lookup_lengths=LOOKUP_LENGTHS, tree_sizes=TREE_SIZES) -> Dict[str, Any]:
    """Time plain bursts, head steps of each depth, lookup verifications of each
    length and tree steps of each size (over the shortest chain with room for
    them, :func:`mlx_mtpd.tree.shape_for`) through the real decoding loop, in
    interleaved rounds (the median of `repeats` rounds after one warm-up round).
    Returns {"plain": s/token, "heads": {d: s}, "lookup": {d: s}, "tree": {size: s}}
    ("tree" only where the model can verify trees)."""
    from .engine import caught_up, mtp_generate_step
    from .planner import DraftPlanner
    from .suffix import Proposal
    from .tree import min_depth, shape_for, tree_size

    depth = max(head_depths) if head_set is not None else 0
    # Interleaved rounds (the first one warms up): a machine's speed drifts, and every
    # option is then measured over the same minutes as plain decoding.
    one_round = [("plain", 16)] + [("heads", d) for d in (head_depths if head_set is not None else ())]
    one_round += [("lookup", n) for n in lookup_lengths]
    if head_set is not None:
        one_round += [("tree", n) for n in tree_sizes if min_depth(n) <= depth]
    schedule = one_round * (repeats + 1)
    samples: Dict[tuple, List[float]] = {}

    class Recorder(DraftPlanner):
        def plan(self, st, remaining):
            self.widths = None
            while schedule and schedule[0][0] != "plain" and (
                    not st.can_verify(schedule[0][1])  # a cache that cannot take this back
                    or (schedule[0][0] == "tree" and (st.tree_reason is not None
                                                      or not st.tree_room(schedule[0][1])))):
                schedule.pop(0)
            if not schedule:
                return "plain", 1, None
            kind, n = schedule.pop(0)
            if kind == "tree":
                self.widths = shape_for(n)
                self.stop_match = None
                mx.eval(caught_up(st, min_depth(n), reserve=1))
                return "heads", min_depth(n), None
            if kind == "heads":  # depths up to date, as after another head step (the step is timed)
                mx.eval(caught_up(st, n, reserve=1))
            if kind == "lookup":  # any tokens: a rejected draft costs what an accepted one does
                ctx = st.tokens[-n:] if len(st.tokens) >= n else (st.tokens * n)[:n]
                return "lookup", Proposal(list(ctx), 2), None
            self.stop_match = None
            return kind, n, None

        def observe(self, kind, d, accepted, seconds, match=0):
            if seconds is not None:
                samples.setdefault((kind, d), []).append(seconds)

        def observe_tree(self, d, widths, a_chain, rank, seconds, accepted=None):
            if seconds is not None:
                samples.setdefault(("tree", tree_size(widths)), []).append(seconds)

        def observe_plain(self, tokens, seconds):
            samples.setdefault(("plain", 0), []).append(seconds / max(tokens, 1))

    planner = Recorder(max(depth, 1) if head_set is not None else 1,
                       "heads+lookup" if head_set is not None else "prompt-lookup", max_draft=max(depth, 1))
    planner.auto = True  # the lookup cap is the longest length measured
    planner.lookup_cap = max(lookup_lengths)
    gen = mtp_generate_step(mx.array(prompt), model, head_set, planner=planner, max_tokens=-1,
                            num_draft=planner.num_draft)
    for _ in gen:
        if not schedule:
            break
    gen.close()

    def median(xs):
        # The lower quartile of the rounds after the first (a warm-up): other load on the
        # machine only ever adds time, and a ratio of two disturbed figures misleads the
        # planner for the whole process (it corrects them only from typical steps).
        xs = sorted(xs[1:] if len(xs) > 1 else xs)
        return xs[(len(xs) - 1) // 4]

    out: Dict[str, Any] = {"plain": median(samples[("plain", 0)]), "heads": {}, "lookup": {}, "tree": {},
                           "context_tokens": len(prompt)}
    for (kind, d), xs in sorted(samples.items()):
        if kind != "plain":
            out[kind][str(d)] = median(xs)
    return out


def head_acceptance(head_dir: Optional[Path], loop: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """A head set's measured acceptance by draft position from its eval.json:
    {"acceptance": [AR_1, ...], "source": "decoding" | "teacher-forced", "by_temp":
    {temperature: [AR_1, ...]} (sampled decoding, eval-heads --temp)}, or None.

    Decoding acceptance (eval-heads) is preferred: the entry with the most draft
    positions (at the head set's loop policy); else the trainer's teacher-forced
    agreement per head (train --export), which overstates decoding somewhat and
    is given less weight."""
    if head_dir is None:
        return None
    try:
        rec = json.loads((Path(head_dir) / EVAL_FILE).read_text())
    except (OSError, ValueError):
        return None
    best, ranks, tried = None, None, 0
    by_temp: Dict[float, List[float]] = {}
    for entry in (rec.get("decoding") or {}).values():
        if not isinstance(entry, dict):
            continue
        temp = float(entry.get("temp") or 0.0)
        if temp > 0:  # sampled (eval-heads --temp): the prior of generations near that temperature
            rates = entry.get("acceptance_rates")
            if (rates and not entry.get("tree") and (loop is None or entry.get("loop") in (None, loop))
                    and len(rates) > len(by_temp.get(temp, []))):
                by_temp[temp] = [float(x) for x in rates]
            continue
        if entry.get("tree"):  # a tree's acceptance by rank (its acceptance by position counts alternatives)
            table = entry.get("rank_acceptance")
            if table and entry.get("tree_steps", 0) > tried:
                ranks, tried = table, entry.get("tree_steps", 0)
            continue
        rates = entry.get("acceptance_rates")
        if not rates or (loop is not None and entry.get("loop") not in (None, loop)):
            continue
        if best is None or len(rates) > len(best):
            best = rates
    if ranks:  # ranks never tried: the rank before's rate, halved
        ranks = [[x for x in row] for row in ranks]
        for row in ranks:
            for k, x in enumerate(row):
                if x is None:
                    row[k] = 0.5 * row[k - 1] if k else 0.2
    if best:
        return {"acceptance": [float(x) for x in best], "source": "decoding", "ranks": ranks, "by_temp": by_temp}
    tf = rec.get("teacher_forced_agreement")
    if tf:
        return {"acceptance": [float(x) for x in tf], "source": "teacher-forced"}
    return None


def seed_acceptance(planner, found: Optional[Dict[str, Any]]):
    """Seed a planner's head acceptance with `found` (head_acceptance's answer, or
    None: nothing), a decoding measurement at full weight, the trainer's
    teacher-forced agreement at less.  Returns the planner."""
    from .planner import MEASURED_PRIOR_WEIGHT

    if found is not None:
        weight = MEASURED_PRIOR_WEIGHT if found["source"] == "decoding" else 2.0
        planner.seed(acceptance=found["acceptance"], weight=weight, ranks=found.get("ranks"),
                     by_temp=found.get("by_temp"))
    return planner


def seed_planner(planner, model: nn.Module, tokenizer, head_set=None, *, measure: bool = True,
                 quiet: bool = False):
    """Seed an `auto` planner with the head set's acceptance and this device's step
    costs (measured now when they are not cached and `measure`).  Returns the planner."""
    if not getattr(planner, "auto", False):
        return planner
    if head_set is not None and planner.uses_heads:
        seed_acceptance(planner, head_acceptance(getattr(head_set, "path", None), head_set.config.get("loop")))
    costs = step_costs(model, tokenizer, head_set if planner.uses_heads else None, measure=measure, quiet=quiet)
    if costs is not None:
        planner.seed(costs=costs)
    return planner
