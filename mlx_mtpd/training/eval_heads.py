"""`mlx_mtpd eval-heads`: how well a head set drafts, on held-out prompts.

Teacher-forced: each head's top-1 agreement with the backbone's greedy token.
In real decoding (greedy, lossless): AR_k, CAR_k and the mean accepted length
tau for D = 1..8 with each loop policy.  JSON for scripts, a PNG plot of
acceptance by draft position.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx

from ..errors import MTPDError
from ..prompts import EVAL_PROMPTS

TF_MAX_DEPTH = 4  # teacher-forced agreement is reported up to this depth (or the heads)
DRAFT_SCALES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # factors on T tried for the heads' sampled drafts


def conversation_prompt(prompt):
    """A prompt as the backbone answers it: text as is; a chat `messages` record
    up to its last user turn (the answer that followed it is the model's to give)."""
    if isinstance(prompt, str):
        return prompt
    last_user = max((i for i, m in enumerate(prompt) if isinstance(m, dict) and m.get("role") == "user"), default=-1)
    return prompt[: last_user + 1] if last_user >= 0 else None


def decoding_acceptance(model, tokenizer, heads, prompts: List[str], *, max_tokens: int,
                        drafts: List[int], loops: List[str], progress: bool = True,
                        trees=(None,), temps=(0.0,)) -> Dict[str, dict]:
    """Aggregate SpecStats over `prompts` for every (D, loop, tree, temperature);
    loop only matters for D > K; `trees`: None (chains) and/or widths
    (mlx_mtpd.tree), greedy only; `temps`: sampling temperatures (0: greedy;
    sampled answers are seeded per prompt, so a rerun repeats them)."""
    from ..tree import fork_of, shape_name, widths_for

    from tqdm import tqdm

    from ..engine import SpecStats, mtp_generate_step
    from ..prompts import chat_messages

    ids = [mx.array(tokenizer.apply_chat_template(chat_messages(p), add_generation_prompt=True)) for p in prompts]
    configs = [(d, lp, tr, t) for t in temps for tr in (trees if t == 0 else [None]) for d in drafts
               for lp in (loops if d > heads.num_heads else loops[:1])]
    results = {}
    bar = tqdm(total=len(configs) * len(ids), desc="decode", unit="run", disable=not progress)
    for d, lp, tr, temp in configs:
        widths = widths_for(tr, d)
        if tr is not None and widths is None:
            continue  # a tree that adds nothing at this D: the chain's row
        total = SpecStats()
        for i, p in enumerate(ids):
            st = SpecStats()
            mx.random.seed(i)
            for _ in mtp_generate_step(p, model, heads, num_draft=d, loop=lp, max_tokens=max_tokens, stats=st,
                                       tree=widths, temp=temp):
                pass
            total.add(st)
            bar.update(1)
        name = (f"D={d},loop={lp}" + (f",tree={shape_name(widths)}" if widths else "")
                + (f",temp={temp:g}" if temp else ""))
        results[name] = {"num_draft": d, "loop": lp, "tree": list(widths) if widths else None,
                         **({"fork": fork_of(widths)} if fork_of(widths) else {}),
                         **({"temp": temp} if temp else {}), **total.as_dict()}
    bar.close()
    return results


def draft_temperature(model, tokenizer, heads, prompts: List, temp: float, *, max_tokens: int,
                      scales=DRAFT_SCALES, progress: bool = True) -> dict:
    """The temperature the heads should draw sampled drafts at when the backbone
    samples at `temp`, as a factor on it: the one that maximizes depth 1's
    expected acceptance E[sum_x min(p(x), q(x))], teacher-forced on the
    backbone's own sampled answers to `prompts` (seeded per prompt; p at `temp`,
    q the head's at `temp` x factor).  An exact expectation at every position,
    so it needs no sampled drafts and carries no acceptance noise.  Returns
    {"scale", "overlap": {factor: mean}, "positions"}."""
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import KVCache, make_prompt_cache
    from mlx_lm.sample_utils import make_sampler
    from tqdm import tqdm

    from ..engine import make_logprobs_transform
    from ..heads import Backbone
    from ..prompts import chat_messages

    backbone = Backbone(model, heads.features)
    head = heads.head_for_depth(1, None)
    entry = heads.entry_hidden(backbone)
    project = backbone.projection_rows(heads.draft_ids)
    eos = set(tokenizer.eos_token_ids)
    p_of = make_logprobs_transform(temp)
    sums, n = {s: 0.0 for s in scales}, 0
    for i, prompt in enumerate(tqdm(prompts, desc=f"draft temperature (T={temp:g})", unit="prompt",
                                    disable=not progress)):
        ids = tokenizer.apply_chat_template(chat_messages(prompt), add_generation_prompt=True)
        mx.random.seed(i)
        answer = []
        for tok, _ in generate_step(mx.array(ids), model, max_tokens=max_tokens, sampler=make_sampler(temp=temp)):
            if int(tok) in eos:
                break
            answer.append(int(tok))
        seq = ids + answer
        if len(answer) < 2:
            continue
        logits, hidden = backbone.forward(mx.array(seq), make_prompt_cache(model))
        h = hidden[: len(seq) - 1]
        out = head(entry(h) if entry is not None else h, backbone.embed_tokens(mx.array(seq[1:])), KVCache())
        q_logits = project(head.norm(out)).astype(mx.float32)
        # depth 1 at position j (h_j, t_{j+1}) drafts t_{j+2}, which the backbone's logits at j + 1 give
        lo, hi = len(ids) - 1, len(seq) - 2
        p = mx.exp(p_of(logits[lo + 1 : hi + 1]))
        if heads.draft_ids is not None:
            p = p[:, heads.draft_ids]
        for s in scales:
            q = mx.exp(make_logprobs_transform(temp * s)(q_logits[lo:hi]))
            sums[s] += mx.minimum(p, q).sum().item()
        n += hi - lo
    if not n:
        raise MTPDError("no answer was long enough to measure the draft temperature on: give more prompts")
    overlap = {s: sums[s] / n for s in scales}
    return {"scale": max(scales, key=lambda s: (overlap[s], s)), "overlap": overlap, "positions": n}


def evaluate(model, tokenizer, heads, prompts: List, *, max_tokens: int, drafts: List[int], loops: List[str],
             trees=(None,), data: Optional[List[str]] = None, name: Optional[str] = None,
             progress: bool = True, temps=(0.0,)) -> dict:
    """eval-heads' results (the eval.json format): decoding acceptance for every
    (D, loop, tree, temperature), teacher-forced agreement on `data` when given,
    and the best (greedy when measured)."""
    out = {"heads": name, "num_heads": heads.num_heads, "prompts": len(prompts), "max_tokens": max_tokens}
    sampled = [t for t in temps if t > 0]
    if sampled:  # measured first: the sampled decoding below drafts at it
        out["draft_temperature"] = {}
        for t in sampled:
            found = draft_temperature(model, tokenizer, heads, prompts, t, max_tokens=max_tokens, progress=progress)
            heads.draft_scales[float(t)] = found["scale"]
            out["draft_temperature"][f"{t:g}"] = found
    if data:
        out["teacher_forced_agreement"] = teacher_forced(
            model, tokenizer, heads, data, depth=max(heads.num_heads, min(max(drafts), TF_MAX_DEPTH)))
    out["decoding"] = decoding_acceptance(model, tokenizer, heads, prompts, max_tokens=max_tokens, drafts=drafts,
                                          loops=loops, trees=trees, progress=progress, temps=temps)
    greedy = [r for r in out["decoding"].values() if not r.get("temp")] or list(out["decoding"].values())
    best = max(greedy, key=lambda r: r["mean_accepted_length"])
    out["best"] = {"num_draft": best["num_draft"], "loop": best["loop"], "tree": best.get("tree"),
                   **({"fork": best["fork"]} if best.get("fork") else {}),
                   "mean_accepted_length": best["mean_accepted_length"],
                   "AR_1": best["acceptance_rates"][0] if best["acceptance_rates"] else 0.0}
    return out


def merged_evaluation(path: Path, new: dict) -> dict:
    """`new` with the decoding entries of the evaluation at `path` kept for the
    temperatures `new` did not measure (a sampled run saved beside a greedy one
    keeps both), and its teacher-forced agreement when `new` has none."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return new
    measured = {float(r.get("temp") or 0.0) for r in new["decoding"].values()}
    kept = {k: r for k, r in (old.get("decoding") or {}).items()
            if isinstance(r, dict) and float(r.get("temp") or 0.0) not in measured}
    out = dict(new, decoding={**kept, **new["decoding"]})
    scales = {k: r for k, r in (old.get("draft_temperature") or {}).items() if _float(k) not in measured}
    scales.update(new.get("draft_temperature") or {})
    if scales:
        out["draft_temperature"] = scales
    if "teacher_forced_agreement" not in out and old.get("teacher_forced_agreement"):
        out["teacher_forced_agreement"] = old["teacher_forced_agreement"]
    greedy = [r for r in out["decoding"].values() if not r.get("temp")]
    if greedy and 0.0 not in measured:  # the best stays greedy's
        out["best"] = old.get("best", out["best"])
    return out


def _float(x) -> Optional[float]:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def plot(results: Dict[str, dict], agreement: Optional[List[float]], path: Path, title: str,
         num_heads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    results = {k: r for k, r in results.items() if not r.get("temp")}  # the plot is greedy's
    chains = {k: r for k, r in results.items() if not r.get("tree")}
    looped = {r["loop"] for r in chains.values() if r["num_draft"] > num_heads} or {"last"}
    for loop, style in (("last", "o-"), ("cycle", "s--")):
        best = [r for r in chains.values() if r["loop"] == loop or r["num_draft"] <= num_heads]
        if not best or loop not in looped:  # a policy that was not run (or cannot differ)
            continue
        deepest = max(best, key=lambda r: r["num_draft"])
        k = range(1, len(deepest["acceptance_rates"]) + 1)
        a1.plot(k, deepest["acceptance_rates"], style, label=f"AR_k ({loop})")
        a1.plot(k, deepest["cumulative_acceptance"], style, alpha=0.5, label=f"CAR_k ({loop})")
        by_d = sorted(best, key=lambda r: r["num_draft"])
        a2.plot([r["num_draft"] for r in by_d], [r["mean_accepted_length"] for r in by_d], style, label=loop)
    shapes = {}
    for r in results.values():
        if r.get("tree"):
            shape = "-".join(map(str, r["tree"][:1] if len(set(r["tree"])) == 1 else r["tree"]))
            shapes.setdefault(shape + (f"/{r['fork']}" if r.get("fork") else ""), []).append(r)
    for shape, rows in shapes.items():
        rows = sorted(rows, key=lambda r: r["num_draft"])
        a2.plot([r["num_draft"] for r in rows], [r["mean_accepted_length"] for r in rows], "^:",
                label=f"tree {shape}")
    if agreement:
        a1.plot(range(1, len(agreement) + 1), agreement, "k^", label="teacher-forced agreement")
    a1.set(xlabel="draft position k", ylabel="rate", ylim=(0, 1), title="acceptance by draft position")
    a2.set(xlabel="draft length D", ylabel="mean accepted length tau", title="tau by draft length")
    for a in (a1, a2):
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    from ..errors import run_main

    p = argparse.ArgumentParser(prog="mlx_mtpd eval-heads", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--heads", default=None, help="Head set (default: the model's own).")
    p.add_argument("--prompts", default=str(EVAL_PROMPTS), help="Held-out prompts (.jsonl or text).")
    p.add_argument("--data", nargs="+", default=None,
                   help="Held-out gen-data for teacher-forced agreement (optional).")
    p.add_argument("--num-prompts", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--num-draft", default="1,2,3,4,5,6,7,8", help="Comma-separated draft lengths.")
    p.add_argument("--loops", default="last,cycle")
    p.add_argument("--tree", nargs="+", default=["off"],
                   help="Tree shapes to evaluate beside (or instead of) chains: off, W or W1,W2,... "
                        "(e.g. --tree off 4 4,3,2 4,1,1/2: /F continues depth 1's alternatives F tokens); "
                        "fixed shapes, greedy.")
    p.add_argument("--temp", default="0",
                   help="Comma-separated sampling temperatures (default 0: greedy), e.g. 0,0.7: `auto` "
                        "starts a generation from the acceptance measured nearest its temperature.")
    p.add_argument("--json", default=None, help="Write the results here.")
    p.add_argument("--plot", default=None, help="Write a PNG plot here.")
    p.add_argument("--save", action="store_true",
                   help="Also write the results as eval.json beside the heads: the acceptance `auto` starts "
                        "from (the planner's prior).")
    args = p.parse_args(argv)

    def run():
        from ..files import EVAL_FILE
        from ..prompts import read_prompts
        from ..utils import load, write_json_atomic

        model, tok, heads = load(args.model, heads=args.heads)
        if heads is None:
            raise MTPDError("no head set to evaluate: pass --heads")
        from ..tree import parse_tree

        drafts = [int(x) for x in args.num_draft.split(",")]
        trees = []
        for x in args.tree:
            t = parse_tree(x)
            if t == "auto":
                raise MTPDError("eval-heads measures fixed shapes: --tree off, W, W1,W2,... or either with /F")
            trees.append(t)
        loops = args.loops.split(",")
        try:
            temps = [float(x) for x in args.temp.split(",")]
        except ValueError:
            raise MTPDError(f"--temp takes comma-separated numbers, e.g. 0,0.7 (got {args.temp!r})") from None
        if any(t < 0 for t in temps):
            raise MTPDError(f"--temp must be >= 0 (got {args.temp})")
        if args.num_prompts < 1:
            raise MTPDError(f"--num-prompts must be at least 1 (got {args.num_prompts})")
        prompts = [conversation_prompt(p) for p in read_prompts(args.prompts)]
        prompts = [p for p in prompts if p][: args.num_prompts]
        if not prompts:
            raise MTPDError(f"{args.prompts} holds no prompt to answer (a 'messages' record needs a user turn)")
        out = evaluate(model, tok, heads, prompts, max_tokens=args.max_tokens, drafts=drafts, loops=loops,
                       trees=trees, data=args.data, name=str(args.heads), temps=temps)
        agreement, best = out.get("teacher_forced_agreement"), out["best"]
        for key, r in out["decoding"].items():
            ar = " ".join(f"{a:.2f}" for a in r["acceptance_rates"])
            print(f"{key:<18} tau {r['mean_accepted_length']:.2f}  AR_k {ar}")
        if agreement:
            print("teacher-forced agreement: " + " ".join(f"{a:.3f}" for a in agreement))
        if args.json:
            write_json_atomic(Path(args.json), out)
        if args.save:
            if heads.path is None:
                raise MTPDError("--save needs a head set folder: pass --heads")
            write_json_atomic(Path(heads.path) / EVAL_FILE, merged_evaluation(Path(heads.path) / EVAL_FILE, out))
            print(f"[mlx_mtpd] wrote {Path(heads.path) / EVAL_FILE}", file=sys.stderr)
        if args.plot:
            title = f"{heads.num_heads} head(s), {len(prompts)} held-out prompts x {args.max_tokens} tokens, greedy"
            plot(out["decoding"], agreement, Path(args.plot), title, heads.num_heads)
        shape = f" tree={'-'.join(map(str, best['tree']))}" if best.get("tree") else ""
        shape += f"/{best['fork']}" if best.get("fork") else ""
        print(f"best: D={best['num_draft']} loop={best['loop']}{shape} tau {best['mean_accepted_length']:.2f}",
              file=sys.stderr)

    run_main("eval-heads", run)


def teacher_forced(model, tokenizer, heads, data: List[str], seq_len: int = 512, top_n: int = 256,
                   depth: int = 0) -> List[float]:
    """Top-1 agreement with the backbone's greedy token per depth, teacher-forced
    on answer tokens (depths beyond the heads loop them, as the engine does):
    on greedy data, depth k's agreement is the acceptance rate AR_k of greedy
    decoding at positions where the k-1 drafts before it were accepted."""
    import tempfile

    from .data_cache import open_cache, prepare_cache, read_sequences
    from ..heads import Backbone
    from .train import TrainConfig, teacher_forced_agreement

    seqs, _ = read_sequences(data, tokenizer, seq_len)
    with tempfile.TemporaryDirectory() as d:
        path = prepare_cache(model, seqs, Path(d) / "eval", top_n, desc="backbone (eval)", features=heads.features)
        cache = open_cache(path)
        k = heads.num_heads
        cfg = TrainConfig(num_heads=k, alpha=[1.0] * k, beta=[1.0] * k, top_n=top_n, train_depth=max(depth, k))
        return teacher_forced_agreement(heads, Backbone(model, heads.features), cache, cfg)
