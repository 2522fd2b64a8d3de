"""`mlx_mtpd distill`: heads for your own model in one command, with a verdict.

From a model folder to a head set measured on this device, within a time
budget (`--minutes` / `--hours`, default an hour):

1. held-out answers: prompts kept apart from training, answered by the model
   (this device's generation speed is measured on them);
2. data: answers to the prompt pool (the project's, shipped in the package, or
   `--prompts`), generated with the backbone's outputs kept, so no token takes a
   second backbone pass; they join the growing data set of the work folder;
3. training: the project's recipe (`make heads`): layers fused for the model's
   depth, answers only, the trained loop, as many steps as the time left allows,
   early stopping, the best evaluated step exported; a model's own heads
   (native MTP layers, the shipped head, an earlier run's) are the start, and are
   kept when training does not beat them;
4. the verdict: acceptance by position and the speed-up over plain mlx-lm in a
   short chat-like bench with `auto` (greedy and T = 0.7), before and after; one
   line, a JSON report and PNGs beside the head.

All of it lives in a work folder and is resumable: after Ctrl-C or a crash the
same command continues where it stopped (answers, caches, the trainer's
checkpoint and optimizer, the benches done); a run after a finished one starts
a new round that continues from its head and data with a new budget.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import MTPDError
from ..files import HEADS_CONFIG, HEADS_WEIGHTS, home, write_json_atomic

STATE = "state.json"
REPORT = "distill.json"
CURVE_PNG = "learning_curve.png"
ACCEPTANCE_PNG = "acceptance.png"
DEFAULT_MINUTES = 60.0
TEMPS = (0.0, 0.7)  # the verdict's benches
PAYS = 1.02  # a greedy speed-up below this is within a bench's noise: it does not pay yet
RECIPE = {  # `make heads` (docs/TRAINING.md): one head trained two deep, the teacher's top 256
    "num_heads": 1, "train_depth": 2, "top_n": 256, "batch_size": 8, "patience": 4, "warmup": 30,
    "learning_rate": 1e-3, "learning_rate_continued": 5e-4, "max_tokens": 256,
}


# -- what the run needs to know first -------------------------------------------------------------------


def features_for(num_layers: int) -> List[int]:
    """The layers fused into depth 1 for a backbone this deep: one early, the middle
    and one near the end (2, 15, 27 for SmolLM2's 30 layers: docs/RESEARCH.md's
    ablation); none for very shallow models."""
    if num_layers < 6:
        return []
    return sorted({max(1, round(num_layers / 15)), num_layers // 2, num_layers - 3})


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def memory_estimate(model_path: Path, batch_size: int, max_tokens: int) -> Dict[str, float]:
    """Bytes a distill run of this model needs at its peak (batched generation): the
    weights, the batch's KV cache, the heads with their optimizer state and a margin."""
    from ..files import on_gpu

    cfg = json.loads((model_path / "config.json").read_text())
    cfg = cfg.get("text_config", cfg) | {k: v for k, v in cfg.items() if k != "text_config"}
    weights = float(sum(f.stat().st_size for f in model_path.glob("*.safetensors")))
    layers = int(cfg.get("num_hidden_layers", 1))
    hidden = int(cfg.get("hidden_size", 1))
    heads = int(cfg.get("num_attention_heads", 1))
    kv_heads = int(cfg.get("num_key_value_heads", heads) or heads)
    head_dim = int(cfg.get("head_dim") or hidden // max(heads, 1))
    width = 2 if on_gpu() else 4
    kv = float(batch_size * (max_tokens + 256) * layers * 2 * kv_heads * head_dim * width)
    head = 4 * (weights / max(layers, 1) + 3 * hidden * hidden * width)  # weights, gradients, two moments
    return {"weights": weights, "kv": kv, "heads": head, "total": 1.1 * weights + kv + head + 0.5 * 2**30}


def check_memory(model_path: Path, batch_size: int, max_tokens: int) -> Dict[str, float]:
    est = memory_estimate(model_path, batch_size, max_tokens)
    have = physical_memory()
    if have and est["total"] > 0.85 * have:
        g = 2**30
        raise MTPDError(
            f"{model_path} needs about {est['total'] / g:.1f} GiB to distill (weights {est['weights'] / g:.1f} GiB, "
            f"the KV cache of a generation batch of {batch_size}: {est['kv'] / g:.1f} GiB) and this machine has "
            f"{have / g:.1f} GiB: quantize it (`mlx_mtpd convert ... -q`) or lower --batch-size")
    return est


def device_name() -> str:
    """The device in words: "CPU, x86_64, 2 cores" or the GPU's name."""
    import platform

    import mlx.core as mx

    from ..files import on_gpu

    if on_gpu():
        try:
            return str(mx.device_info().get("device_name") or "GPU")
        except Exception:  # an MLX without device_info
            return "GPU"
    return f"CPU, {platform.machine()}, {os.cpu_count()} cores"


def decode_speed(model, tokenizer, tokens: int = 24) -> float:
    """Plain mlx-lm decoding's tokens per second on this device (one short timed run)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from ..costs import prompt_ids

    prompt = mx.array(prompt_ids(tokenizer))
    for n, timed in ((4, False), (tokens, True)):
        tic = time.perf_counter()
        for i, _ in zip(range(n), generate_step(prompt, model, max_tokens=n)):
            if i == 0:
                tic = time.perf_counter()  # the prefill is not decoding
        if timed:
            return (n - 1) / max(time.perf_counter() - tic, 1e-9)
    return 0.0


def held_out_split(prompts: List, pool: bool) -> tuple:
    """(training prompts, held-out prompts).  The project's pool has its own
    held-out prompts (topics it never uses); a user's file keeps every tenth
    prompt apart (by a hash of its text, so the split never changes as the file grows)."""
    from ..prompts import EVAL_PROMPTS, read_prompts

    if pool:
        return prompts, read_prompts(EVAL_PROMPTS)

    def bucket(p) -> int:
        return int(hashlib.sha1(json.dumps(p, sort_keys=True).encode()).hexdigest()[:8], 16) % 10

    held = [p for p in prompts if bucket(p) == 0]
    if len(held) < 4:  # a short file: its last prompts
        held = prompts[-max(min(4, len(prompts) // 4), 1):]
    train = [p for p in prompts if p not in held]
    if not train:
        raise MTPDError("--prompts needs at least two prompts: some train the heads, some are held out to judge them")
    return train, held


def _write_prompts(path: Path, prompts: List) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        for p in prompts:
            f.write(json.dumps({"messages": p} if isinstance(p, list) else {"prompt": p}) + "\n")
    os.replace(tmp, path)


# -- the run's state ---------------------------------------------------------------------------------------


class State(dict):
    """The work folder's state.json: which phases of which round are done, what
    they measured, and the time spent on the round (the budget counts running time)."""

    def __init__(self, work: Path):
        super().__init__()
        self.path = Path(work) / STATE
        self.started = time.time()
        if self.path.exists():
            try:
                self.update(json.loads(self.path.read_text()))
            except json.JSONDecodeError:
                pass  # a state cut by a crash: its phases run again (each resumes its own files)
        self.setdefault("round", 1)
        self.setdefault("phases", {})
        self.setdefault("spent", 0.0)
        self.setdefault("rounds", [])
        self.base = float(self["spent"])

    def spent(self) -> float:
        return self.base + time.time() - self.started

    def save(self) -> None:
        self["spent"] = round(self.spent(), 2)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, dict(self))

    def new_round(self) -> None:
        """A finished round's summary is kept; its head is the next one's start."""
        self["rounds"].append({"round": self["round"], "report": self.get("report")})
        self["round"] += 1
        held_out = self["phases"].get("eval")  # the same held-out answers judge every round
        self["phases"] = {"eval": held_out} if held_out else {}
        self["spent"], self.base, self.started = 0.0, 0.0, time.time()
        self.pop("report", None)
        self.pop("done", None)


class Clock:
    """The budget: what is left, and a progress bar over it with the current phase."""

    def __init__(self, state: State, budget: Optional[float]):
        from tqdm import tqdm

        self.state, self.budget = state, budget
        self.bar = tqdm(total=round(budget) if budget else None, unit="s", desc="distill", position=0,
                        bar_format="{desc}: {percentage:3.0f}% |{bar}| {n:.0f}/{total:.0f} s [{remaining} left]"
                        if budget else "{desc}: {elapsed}")

    def left(self) -> float:
        return (self.budget - self.state.spent()) if self.budget else math.inf

    def deadline(self, reserve: float = 0.0) -> Optional[float]:
        return time.time() + self.left() - reserve if self.budget else None

    def phase(self, name: str, text: str) -> None:
        self.bar.set_description_str(f"distill [{name}]")
        if self.budget:
            self.bar.n = min(round(self.state.spent()), self.bar.total)
        self.bar.refresh()
        left = f" ({_minutes(self.left())} left of the budget)" if self.budget else ""
        print(f"\n[mlx_mtpd distill] {name}: {text}{left}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.budget:
            self.bar.n = min(round(self.state.spent()), self.bar.total)
        self.bar.close()


def _minutes(seconds: float) -> str:
    seconds = max(seconds, 0)
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


# -- the phases --------------------------------------------------------------------------------------------


def _answers(path: Path) -> List[dict]:
    from .gen_data import read_records

    return list(read_records(path)) if path.exists() else []


def _bench_one(model, tokenizer, heads, prompts, max_tokens: int, temp: float) -> dict:
    from ..bench import bench

    r = bench(model, tokenizer, heads, prompts, max_tokens=max_tokens, drafts=["auto"], temp=temp, draft="heads",
              mode="cold", progress=True)
    row = r["by_num_draft"]["D=auto"]
    return {"speedup": r["speedup"], "plain_tokens_per_s": r["plain_tokens_per_s"],
            "tokens_per_s": r["mtp_tokens_per_s"], "tau": r["mean_accepted_length"],
            "acceptance_by_position": r["acceptance_by_position"], "acceptance_rates": row["acceptance_rates"],
            "steps_by_source": row["steps_by_source"], "identical_outputs": r["identical_outputs"],
            "prompts": r["num_prompts"], "max_tokens": max_tokens, "temp": temp}


def _curve_note(history: List[dict]) -> str:
    """What the learning curve says: held-out agreement per doubling of training tokens."""
    import numpy as np

    pts = [(h["tokens_seen"], h["eval_agreement"][0]) for h in history
           if "eval_agreement" in h and h.get("tokens_seen", 0) > 0]
    if len(pts) < 3:
        return "too few evaluations to read a learning curve: give it more time"
    x = np.log2([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    slope = float(np.polyfit(x, y, 1)[0])
    if slope > 0.005:
        return (f"the learning curve still climbs ({slope:+.3f} held-out agreement per doubling of training "
                "tokens): a longer run (--hours 2) or more data should help")
    return (f"the learning curve is flat ({slope:+.3f} per doubling of training tokens): more data (a longer run "
            "generates it, --prompts adds your own) rather than more steps")


def _verdict(report: dict, out: Path) -> str:
    after, before = report["after"], report.get("before")
    g, t = after["bench"]["greedy"], after["bench"]["temp"]
    speeds = f"{g['speedup']:.2f}x greedy, {t['speedup']:.2f}x at T = 0.7 (tau {g['tau']:.2f})"
    if report["kept"]:
        tf = before.get("teacher_forced_agreement") if before else None
        score = f": held-out agreement {tf[0]:.3f}" if tf else ""
        head = f"the heads it started from were kept (training did not beat them{score}); they are in {out}/"
    else:
        head = f"the head is in {out}/"
    if before and not report["kept"]:
        speeds += f"; before: {before['bench']['greedy']['speedup']:.2f}x greedy"
    if g["speedup"] >= PAYS and t["speedup"] >= PAYS:
        return f"pays: {speeds}; {head}"
    if g["speedup"] >= PAYS:
        return (f"pays in greedy decoding, not yet at T = 0.7: {speeds} (`auto` drafts less where it does "
                f"not pay); {report['curve']}; {head}")
    return f"does not pay yet on this device: {speeds}; {report['curve']}; {head}"


def _save_png(fig, path: Path) -> None:
    """Write a figure under a temporary name, then rename it into place."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _plots(report: dict, history: List[dict], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [h for h in history if "eval_agreement" in h and h.get("tokens_seen", 0) > 0]
    start = next((h["eval_agreement"] for h in history if h["step"] == 0 and "eval_agreement" in h), None)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for k in range(len(pts[0]["eval_agreement"]) if pts else 0):
        line = ax.plot([h["tokens_seen"] for h in pts], [h["eval_agreement"][k] for h in pts], "o-",
                       label=f"depth {k + 1}")
        if start:
            ax.axhline(start[k], ls="--", lw=1, color=line[0].get_color(), label=f"depth {k + 1}, the start")
    if pts:
        ax.set_xscale("log")
    ax.set(xlabel="training tokens seen (answer tokens)", ylabel="held-out top-1 agreement", ylim=(0, 1),
           title=f"distill round {report['round']}: learning curve")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save_png(fig, folder / CURVE_PNG)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, part, style in (("before", report.get("before"), "s--"), ("after", report["after"], "o-")):
        if not part or (name == "before" and report["kept"]):
            continue
        rates = part["bench"]["greedy"]["acceptance_rates"]
        a1.plot(range(1, len(rates) + 1), rates, style,
                label="the start, kept" if report["kept"] else name)
    a1.set(xlabel="draft position k", ylabel="acceptance rate AR_k (greedy bench)", ylim=(0, 1),
           title="acceptance by draft position")
    labels, values = [], []
    for name in ("before", "after"):
        part = report.get(name)
        if part and not (name == "before" and report["kept"]):
            for temp in ("greedy", "temp"):
                who = "kept" if report["kept"] else name
                labels.append(f"{who}\n{'greedy' if temp == 'greedy' else 'T = 0.7'}")
                values.append(part["bench"][temp]["speedup"])
    a2.bar(range(len(values)), values, color="tab:blue")
    a2.axhline(1.0, color="k", lw=0.8)
    a2.set_xticks(range(len(values)), labels, fontsize=8)
    a2.set(ylabel="speed-up over plain mlx-lm", title=f"`auto`, heads alone ({report['device']})")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    a1.legend(fontsize=8)
    _save_png(fig, folder / ACCEPTANCE_PNG)


def _copy_heads(src: Path, dest: Path) -> None:
    """A head set's files into `dest`: into a model folder beside its weights (each
    file renamed into place), else as a folder built whole and renamed."""
    from ..files import EVAL_FILE, atomic_dir

    names = [n for n in (HEADS_WEIGHTS, HEADS_CONFIG, EVAL_FILE) if (src / n).exists()]
    if dest.resolve() == src.resolve():
        return
    if (dest / "config.json").exists():
        for n in names:
            tmp = dest / f".{n}.tmp"
            shutil.copyfile(src / n, tmp)
            os.replace(tmp, dest / n)
        return
    keep = [n for n in (REPORT, CURVE_PNG, ACCEPTANCE_PNG) if (dest / n).exists()]
    with atomic_dir(dest, force=True) as tmp:
        for n in names:
            shutil.copyfile(src / n, tmp / n)
        for n in keep:
            shutil.copyfile(dest / n, tmp / n)


def _check_out(out: Path) -> None:
    """--out: a model folder, a new folder, or one that holds only a head set and its report."""
    from ..files import EVAL_FILE

    if not out.exists() or (out / "config.json").exists():
        return
    if not out.is_dir():
        raise MTPDError(f"--out {out} is a file: give a folder (new, or a model folder)")
    ours = {HEADS_WEIGHTS, HEADS_CONFIG, EVAL_FILE, REPORT, CURVE_PNG, ACCEPTANCE_PNG, "README.md"}
    other = [p.name for p in out.iterdir() if p.name not in ours]
    if other:
        raise MTPDError(f"--out {out} holds other files ({', '.join(sorted(other)[:3])}): give a new folder, "
                        "a head set folder or a model folder")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _budget(opts) -> Optional[float]:
    if opts.minutes is not None and opts.hours is not None:
        raise MTPDError("give --minutes or --hours, not both")
    if opts.minutes is not None or opts.hours is not None:
        seconds = 60.0 * opts.minutes if opts.minutes is not None else 3600.0 * opts.hours
        if seconds <= 0:
            raise MTPDError("the budget (--minutes / --hours) must be positive")
        return seconds
    if opts.new is not None and opts.steps is not None:
        return None  # counted, not timed (`make heads`, the tests)
    return 60.0 * DEFAULT_MINUTES


def distill(opts) -> dict:
    """The whole run (see the module's text); returns the report."""

    from .. import blas
    from ..files import EVAL_FILE
    from ..heads import Backbone, load_heads
    from ..prompts import POOL_PROMPTS, read_prompts
    from ..utils import load, resolve_model
    from .dataset import read_manifest
    from .eval_heads import conversation_prompt
    from .gen_data import gen_data
    from .train import STATE_FILE, build_parser, train_cli

    budget = _budget(opts)
    for name in ("batch_size", "max_tokens", "eval_prompts", "bench_tokens"):
        if getattr(opts, name) < 1:
            raise MTPDError(f"--{name.replace('_', '-')} must be at least 1")
    model_path = resolve_model(opts.model)
    pool = opts.prompts is None
    prompts = read_prompts(POOL_PROMPTS if pool else Path(opts.prompts))
    train_prompts, held_out = held_out_split(prompts, pool)
    held_out = [p for p in (conversation_prompt(p) for p in held_out) if p][: opts.eval_prompts]
    check_memory(model_path, opts.batch_size, opts.max_tokens)
    model, tok, own = load(opts.model)
    fp = Backbone(model).fingerprint()
    out = Path(opts.out) if opts.out else model_path
    _check_out(out)
    work = Path(opts.work) if opts.work else home() / "distill" / f"{model_path.name}-{_digest(fp)}"
    if opts.fresh and work.exists():
        shutil.rmtree(work)
    state = State(work)
    if state.get("fingerprint") not in (None, _digest(fp)):
        raise MTPDError(f"{work} holds a distill run of another model: give another --work, or --fresh")
    if state.get("done"):
        state.new_round()
    rnd = state["round"]
    previous = work / f"checkpoint-r{rnd - 1}"
    start_dir = None  # the start's shipping form, kept when training does not beat it
    if rnd > 1 and (previous / HEADS_CONFIG).exists():
        init_dir, start_dir = previous, work / f"heads-r{rnd - 1}"
    elif opts.init_from:
        init_dir = Path(opts.init_from)
    else:
        init_dir = Path(own.path) if own is not None else None
    init = load_heads(init_dir, model) if init_dir is not None else None  # refuses another backbone's heads
    start_dir = start_dir or init_dir

    # this device's speed, and what the budget can hold
    speed = decode_speed(model, tok)
    answer_len = 0.5 * opts.max_tokens
    bench_len = min(opts.bench_tokens, answer_len)
    benches = 2 * len(TEMPS) * (2 if init is not None else 1) + 1  # plain + drafting, per temperature; eval
    costs_once = 200 / speed  # step costs of a new head set, measured once
    est_eval = len(held_out) * answer_len / (speed * min(len(held_out), 4))

    def verdict_cost(n: int) -> float:
        return n * bench_len * benches / speed + costs_once

    n_bench = opts.bench_prompts
    if budget is not None:
        least = est_eval + verdict_cost(2) + 60
        if budget < least and not state["phases"]:
            raise MTPDError(
                f"a budget of {_minutes(budget)} is too small for one evaluation of the heads on this device "
                f"(about {_minutes(least)}: {speed:.1f} tokens/s, {len(held_out)} held-out answers and a "
                f"{len(TEMPS)}-temperature bench): give --minutes {math.ceil(least / 60 * 1.5)} or more")
        if n_bench is None:
            per = bench_len * benches / speed
            n_bench = int(max(min((0.2 * budget - costs_once) / per, 8), 2))
    n_bench = min(n_bench or 8, len(held_out))
    state.update(fingerprint=_digest(fp), model=str(model_path))
    state.save()
    clock = Clock(state, budget)
    phases = state["phases"]
    data_dir = Path(opts.data) if opts.data else work / "data"
    features = init.features if init is not None else features_for(fp["num_layers"])
    print(f"[mlx_mtpd distill] {model_path.name}: round {rnd}, work folder {work}; plain decoding "
          f"{speed:.1f} tokens/s here; starting from {init_dir or 'new heads'}", file=sys.stderr)
    try:
        # 1. held-out answers
        eval_dir = Path(opts.eval_data) if opts.eval_data else work / "eval"
        if opts.eval_data and "eval" not in phases:  # answered before (make heads: runs/eval)
            recs = _answers(eval_dir / "data.jsonl")
            if not recs:
                raise MTPDError(f"--eval-data {eval_dir} holds no gen-data answers (data.jsonl)")
            toks = sum(len(r["completion_tokens"]) for r in recs)
            phases["eval"] = {"answers": len(recs), "tokens": toks, "seconds": None,
                              "tokens_per_s": 4 * speed, "mean_answer": toks / len(recs)}
        if "eval" not in phases:
            clock.phase("1/4 held-out", f"answering {len(held_out)} held-out prompts")
            _write_prompts(work / "held_out.jsonl", held_out)
            tic = time.perf_counter()
            gen_data(None, work / "held_out.jsonl", work / "eval", max_tokens=opts.max_tokens,
                     batch_size=min(opts.batch_size, len(held_out)), temps=(0.0,), resume=True,
                     loaded=(model, tok))
            recs = _answers(work / "eval" / "data.jsonl")
            toks = sum(len(r["completion_tokens"]) for r in recs)
            phases["eval"] = {"answers": len(recs), "tokens": toks, "seconds": round(time.perf_counter() - tic, 2),
                              "tokens_per_s": toks / max(time.perf_counter() - tic, 1e-9),
                              "mean_answer": toks / max(len(recs), 1)}
            state.save()
        ev = phases["eval"]
        if "cache_tokens_per_s" not in ev:  # the held-out cache training needs, made now: its speed is known
            from .data_cache import caches_for

            tic = time.perf_counter()
            cache = caches_for(model, tok, [str(eval_dir)], work / "cache" / "eval", seq_len=512,
                               top_n=min(RECIPE["top_n"], fp["vocab_size"]), features=features,
                               backbone=Backbone(model, features), name="eval")
            ev["cache_tokens_per_s"] = cache["tokens"] / max(time.perf_counter() - tic, 1e-9)
            state.save()
        answer_len = max(ev["mean_answer"], 8.0)
        reserve = verdict_cost(n_bench) * (min(opts.bench_tokens, answer_len) / bench_len)
        # 2. data
        if "data" not in phases:
            if opts.new is not None:
                new = opts.new
            else:  # its share of the time; the deadline stops it, the estimate only bounds it
                seconds = 0.45 * max(clock.left() - reserve, 0)  # (at most: see `part` below)
                new = max(int(2 * seconds * ev["tokens_per_s"] / answer_len), 8)
            from . import capture

            kept_outputs = "the backbone's outputs kept" if capture.supported(model) else \
                "its training cache takes one more pass: this model's caches are not plain KV caches"
            source = "the pool" if pool else str(opts.prompts)
            clock.phase("2/4 data", f"answering up to {new} prompts of {source} ({kept_outputs})")
            _write_prompts(work / "train_prompts.jsonl", train_prompts)

            # a model whose caches are not plain KV caches is generated without capture: its
            # training cache then takes one more backbone pass, at the speed the held-out one took
            g, c = ev["tokens_per_s"], ev["cache_tokens_per_s"]
            part = 0.45 if capture.supported(model) else 0.45 * c / (c + g)
            share = None if budget is None else time.time() + part * max(clock.left() - reserve, 0)
            gen_data(None, work / "train_prompts.jsonl", work / "gen", max_tokens=opts.max_tokens,
                     batch_size=opts.batch_size, temps=tuple(opts.temps), resume=True, pack_into=data_dir,
                     new=new, cache_into=work / "cache", features=features, top_n=RECIPE["top_n"],
                     deadline=share if opts.new is None else clock.deadline(reserve), loaded=(model, tok),
                     min_answers=0 if read_manifest(data_dir)["chunks"] else RECIPE["batch_size"])
            phases["data"] = {"new": new}
            state.save()
        # 3. training
        tdir = work / f"train-r{rnd}"
        if "train" not in phases:
            clock.phase("3/4 train", f"MTP-D training from {init_dir or 'new heads'}")
            steps = opts.steps or 0
            every = max(steps // 8, 1) if steps else 50
            args = ["--data", str(data_dir), *opts.extra_data, "--eval-data", str(eval_dir), "--out", str(tdir),
                    "--cache-dir", str(work / "cache"), "--num-heads", str(RECIPE["num_heads"]),
                    "--train-depth", str(RECIPE["train_depth"]), "--top-n", str(RECIPE["top_n"]),
                    "--batch-size", str(RECIPE["batch_size"]), "--warmup", str(RECIPE["warmup"]),
                    "--learning-rate", str(RECIPE["learning_rate_continued" if init is not None
                                                  else "learning_rate"]),
                    "--patience", str(RECIPE["patience"]), "--steps", str(steps), "--eval-every", str(every),
                    "--save-every", str(every), "--export", str(work / f"heads-r{rnd}"),
                    "--export-checkpoint", str(work / f"checkpoint-r{rnd}"),
                    "--resume" if (tdir / STATE_FILE).exists() else "--force"]
            if init_dir is not None:
                args += ["--init-from", str(init_dir)]
            elif features:
                args += ["--features", ",".join(map(str, features))]
            res = train_cli(build_parser().parse_args(args), deadline=clock.deadline(reserve),
                            loaded=(model, tok))
            best = res["best"] or {"step": None, "eval_agreement": None}
            phases["train"] = {"steps": res["steps"], "best_step": best["step"],
                               "best_agreement": best["eval_agreement"]}
            state.save()
        tr = phases["train"]
        history = json.loads((tdir / STATE_FILE).read_text())["history"]
        kept = init is not None and tr["best_step"] in (0, None)
        own_kept = kept and rnd == 1 and opts.out is None  # the model's own heads stay where they are
        after_dir = start_dir if own_kept else work / f"heads-r{rnd}"
        if kept and not own_kept and (start_dir / EVAL_FILE).exists():
            # the export is the start (its best step was step 0), at the shipping precision: its evaluation too
            shutil.copyfile(start_dir / EVAL_FILE, after_dir / EVAL_FILE)
        # 4. the verdict
        verdict = phases.setdefault("verdict", {})
        runs = 2 if init is not None and not kept else 1
        if "prompts" not in verdict:  # as many prompts as the time left holds (the reserve was for the most)
            n = n_bench
            if opts.bench_prompts is None and budget is not None:
                per = min(opts.bench_tokens, answer_len) * (2 * len(TEMPS) * runs + (0 if kept else 1)) / speed
                n = int(0.85 * (clock.left() - costs_once) / per)
            verdict["prompts"] = max(min(n, 8, len(held_out)), min(2, len(held_out)))
            state.save()
        prompts_b = held_out[: verdict["prompts"]]
        clock.phase("4/4 verdict", f"acceptance and speed against plain mlx-lm on {len(prompts_b)} held-out prompts")
        after = load_heads(after_dir, model)
        if not kept and "eval" not in verdict:
            from .eval_heads import evaluate

            ev_out = evaluate(model, tok, after, prompts_b, max_tokens=opts.bench_tokens,
                              drafts=[max(3, after.num_heads)], loops=["last"], name=str(after_dir))
            tf = json.loads((after_dir / EVAL_FILE).read_text()).get("teacher_forced_agreement") \
                if (after_dir / EVAL_FILE).exists() else None
            if tf:
                ev_out["teacher_forced_agreement"] = tf
            write_json_atomic(after_dir / EVAL_FILE, ev_out)  # the prior `auto` starts from
            verdict["eval"] = ev_out["best"]
            state.save()
        for name, heads in [("after", after)] + ([("before", init)] if runs == 2 else []):
            for temp in TEMPS:
                key = f"{name}-{'greedy' if temp == 0 else 'temp'}"
                if key not in verdict:
                    verdict[key] = _bench_one(model, tok, heads, prompts_b, opts.bench_tokens, temp)
                    state.save()
        if kept:
            verdict.setdefault("before-greedy", verdict["after-greedy"])
            verdict.setdefault("before-temp", verdict["after-temp"])
        step0 = next((h["eval_agreement"] for h in history if h["step"] == 0 and "eval_agreement" in h), None)
        chunks = read_manifest(data_dir)["chunks"]
        report = {
            "model": str(model_path), "fingerprint": fp, "round": rnd, "device": device_name(),
            "blas": blas.describe(), "budget_s": budget, "spent_s": round(state.spent(), 1),
            "plain_tokens_per_s": round(speed, 2),
            "data": {"dataset": str(data_dir), "answers": sum(c.get("answers", 0) for c in chunks),
                     "tokens": sum(c.get("tokens", 0) for c in chunks), "chunks": len(chunks),
                     "prompts": "the project's pool" if pool else str(opts.prompts), "held_out": len(held_out)},
            "recipe": {k: v for k, v in RECIPE.items()} | {"features": features, "steps": tr["steps"],
                                                          "exported_step": tr["best_step"]},
            "before": None if init is None else {
                "heads": str(start_dir), "teacher_forced_agreement": step0,
                "bench": {"greedy": verdict["before-greedy"], "temp": verdict["before-temp"]}},
            "after": {"heads": str(out), "teacher_forced_agreement": tr["best_agreement"],
                      "decoding": verdict.get("eval"),
                      "bench": {"greedy": verdict["after-greedy"], "temp": verdict["after-temp"]}},
            "kept": kept,
            "curve": _curve_note(history),
        }
        report["verdict"] = _verdict(report, out)
        # the head, the report and the pictures, beside each other
        if not own_kept:
            _copy_heads(after_dir, out)
        if opts.export_checkpoint and not kept:  # full precision: what the next run continues from
            from ..files import atomic_dir

            with atomic_dir(Path(opts.export_checkpoint), force=True) as tmp:
                for n in (HEADS_WEIGHTS, HEADS_CONFIG):
                    shutil.copyfile(work / f"checkpoint-r{rnd}" / n, tmp / n)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / REPORT, report)
        _plots(report, history, out)
        if opts.upload_repo:
            upload(out, opts.upload_repo, report)
        state["report"] = report
        state["done"] = True
        state.save()
    finally:
        state.save()
        clock.close()
    print(f"\n[mlx_mtpd distill] {report['verdict']}", flush=True)
    print(f"[mlx_mtpd distill] report: {out / REPORT}; plots: {out / CURVE_PNG}, {out / ACCEPTANCE_PNG}",
          file=sys.stderr)
    return report


# -- sharing -------------------------------------------------------------------------------------------------


def model_card(report: dict, repo: str) -> str:
    """A README.md for the head set on the Hugging Face Hub."""
    fp = report["fingerprint"]
    base = Path(report["model"]).name
    after = report["after"]
    g, t = after["bench"]["greedy"], after["bench"]["temp"]
    rates = " / ".join(f"{a:.2f}" for a in g["acceptance_rates"]) or "-"
    return f"""---
library_name: mlx
tags:
- mlx
- mlx-mtpd
- speculative-decoding
- multi-token-prediction
---

# MTP-D heads for {base}

Multi-token-prediction heads trained by self-distillation with
[mlx-mtpd](https://github.com/mlx-mtpd/mlx-mtpd) (`mlx_mtpd distill`): they draft
tokens that {base} verifies in one forward pass, so its answers stay exactly what it
would say alone, only sooner.

```bash
huggingface-cli download {repo} --local-dir heads
mlx_mtpd chat --model {report['model']} --heads heads
```

| | |
|---|---|
| base model | {base} ({fp.get('model_type')}, {fp.get('num_layers')} layers, hidden {fp.get('hidden_size')}, \
vocabulary {fp.get('vocab_size')}) |
| base model fingerprint | `{_digest(fp)}` (the head set refuses another backbone) |
| data | {report['data']['answers']} answers of the model itself, {report['data']['tokens']} tokens \
({report['data']['prompts']}); {report['data']['held_out']} held out |
| recipe | {report['recipe']['num_heads']} head trained {report['recipe']['train_depth']} deep, fused layers \
{report['recipe']['features'] or 'none'}, teacher top-{report['recipe']['top_n']}, {report['recipe']['steps']} steps \
planned, step {report['recipe']['exported_step']} exported |
| acceptance by draft position (greedy) | {rates} (tau {g['tau']:.2f}) |
| speed-up over plain mlx-lm (`auto`, heads alone) | {g['speedup']:.2f}x greedy, {t['speedup']:.2f}x at T = 0.7 |
| measured on | {report['device']}, {report['blas']} |

Verdict of the run: {report['verdict']}
"""


def upload(folder: Path, repo: str, report: dict) -> None:
    """Upload the head set, its report and pictures with a model card, as
    `mlx_lm.convert --upload-repo` uploads a model (huggingface_hub)."""
    from huggingface_hub import HfApi

    from ..files import EVAL_FILE

    staging = Path(folder).parent / f".{Path(folder).name}.upload"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for n in (HEADS_WEIGHTS, HEADS_CONFIG, EVAL_FILE, REPORT, CURVE_PNG, ACCEPTANCE_PNG):
            if (Path(folder) / n).exists():
                shutil.copyfile(Path(folder) / n, staging / n)
        (staging / "README.md").write_text(model_card(report, repo))
        api = HfApi()
        api.create_repo(repo_id=repo, exist_ok=True)
        api.upload_folder(folder_path=str(staging), repo_id=repo, repo_type="model",
                          commit_message="MTP-D heads from mlx_mtpd distill")
        print(f"[mlx_mtpd distill] uploaded to https://huggingface.co/{repo}", file=sys.stderr)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx_mtpd distill", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="MLX model folder or hub id (default: SmolLM2-135M-Instruct).")
    p.add_argument("--minutes", type=float, default=None,
                   help=f"Time budget in minutes (default {DEFAULT_MINUTES:.0f}), verdict included.")
    p.add_argument("--hours", type=float, default=None, help="Time budget in hours.")
    p.add_argument("--prompts", default=None,
                   help="Your own prompts (.jsonl with 'prompt' or chat 'messages', or text, one a line); every "
                        "tenth is held out (default: the project's prompt pool, with its own held-out prompts).")
    p.add_argument("--out", default=None, help="Where the head set goes (default: the model folder, where "
                                               "generate and chat pick it up).")
    p.add_argument("--work", default=None,
                   help="The resumable work folder (default: the cache folder's distill/<model>-<fingerprint>).")
    p.add_argument("--data", default=None, help="The growing token data set (default: WORK/data).")
    p.add_argument("--extra-data", nargs="+", default=[],
                   help="More training data as train's --data takes it (text, JSONL, gen-data folders).")
    p.add_argument("--eval-data", default=None,
                   help="Held-out answers made before (a gen-data folder) instead of answering them here.")
    p.add_argument("--export-checkpoint", default=None,
                   help="Also write the new head at full precision here (what a later --init-from continues).")
    p.add_argument("--init-from", default=None,
                   help="Start from this head set (default: the model's own heads, if any; later rounds: the last).")
    p.add_argument("--fresh", action="store_true", help="Forget the work folder and start over.")
    p.add_argument("--upload-repo", default=None, help="Upload the head set to this Hugging Face repo (user/name).")
    p.add_argument("--batch-size", type=int, default=64, help="Answers generated together (default 64).")
    p.add_argument("--max-tokens", type=int, default=RECIPE["max_tokens"], help="Tokens per answer (default 256).")
    p.add_argument("--temps", type=lambda s: [float(x) for x in s.split(",")], default=[0.0],
                   help="Temperatures of the training answers (default 0).")
    p.add_argument("--eval-prompts", type=int, default=24, help="Held-out answers for evaluation (default 24).")
    p.add_argument("--bench-prompts", type=int, default=None,
                   help="Held-out prompts in the verdict's bench (default: what the budget allows, 2-8).")
    p.add_argument("--bench-tokens", type=int, default=128, help="Longest answer in the verdict's bench.")
    p.add_argument("--new", type=int, default=None, help="Answers to generate this round (default: by the budget).")
    p.add_argument("--steps", type=int, default=None, help="Training steps (default: by the budget).")
    return p


def main(argv=None) -> None:
    from ..errors import run_main

    args = build_parser().parse_args(argv)
    run_main("distill", lambda: distill(args))
