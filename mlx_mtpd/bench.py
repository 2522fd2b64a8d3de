"""`mlx_mtpd bench`: this engine against plain mlx-lm decoding, in one run.

For every prompt, plain `mlx_lm` decoding and this engine at each draft length
run back to back (the order alternates between prompts to cancel drift), on the
same model and machine.  Greedy outputs are compared token for token.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx

from .engine import DraftPlanner, SpecStats, mtp_generate_step
from .kvcache import KVOptions, add_kv_args
from .errors import MTPDError

# The shipped prompt files (`--prompts chat|edits|bench|eval` or a path): the bench prompts are
# held out from training; `edits`: conversations whose last answer edits or repeats an earlier
# one; `chat`: ordinary chat requests written for this benchmark, not from the training pool's
# templates, whose answers end at their end-of-sequence token, as in a chat.
from .prompts import BENCH_PROMPTS, CHAT_PROMPTS, EDITS_PROMPTS, NAMED_PROMPTS  # noqa: E402,F401
# How requests follow one another (`--mode`):
#   run:  each request alone, one planner for the whole run (it keeps what it measured);
#   cold: each request alone with a fresh planner, as a new `mlx_mtpd generate` process gets
#         (it starts from the cached step costs and the head set's evaluation);
#   warm: the requests as successive turns of one chat session: caches and planner kept,
#         each turn prefills only its new tokens (plain mlx-lm keeps its prompt cache too).
MODES = ("run", "cold", "warm")
MODE_TEXT = {"run": "each alone, one planner for the run",
             "cold": "each alone with a fresh planner (as a new process)",
             "warm": "as the turns of one chat session"}
# Sampled answers differ between settings, so in a warm run each setting's own
# history would reach other context lengths (a 2,300-token conversation decodes
# slower than a 1,900-token one whatever drafts): at T > 0 every setting answers
# the same conversation, whose history is plain mlx-lm's answers.  The engine
# then prefills that answer where its own differed (plain mlx-lm has it
# cached), so the comparison errs in plain decoding's favour.


def _run(gen, eos=(), fed: Optional[List[int]] = None) -> tuple:
    """(tokens, total seconds, decode seconds after the first token); an
    end-of-sequence token ends the answer, as in a chat (it is not counted).
    `fed`, when given, receives every token the generator yielded (the end token too)."""
    toks: List[int] = []
    tic = time.perf_counter()
    first = None
    for item in gen:
        if first is None:
            first = time.perf_counter()
        if fed is not None:
            fed.append(int(item[0]))
        if int(item[0]) in eos:
            break
        toks.append(int(item[0]))
    gen.close()
    end = time.perf_counter()
    # mlx-lm decodes on a stream of its own and queues a forward ahead: let it
    # finish before the next run (on a sharded model, collectives of two streams
    # must not interleave differently on different ranks)
    from mlx_lm.generate import generation_stream

    mx.synchronize(generation_stream)
    return toks, end - tic, end - (first or end)


def _plain(prompt, model, max_tokens, temp, prompt_cache=None, kv: Optional[KVOptions] = None):
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    kv = kv or KVOptions()
    return generate_step(prompt, model, max_tokens=max_tokens, sampler=make_sampler(temp=temp),
                         prompt_cache=prompt_cache, max_kv_size=kv.max_kv_size, kv_bits=kv.kv_bits,
                         kv_group_size=kv.kv_group_size, quantized_kv_start=kv.quantized_kv_start)


class PlainConversation:
    """Plain mlx-lm in a chat: one prompt cache kept across turns, rewound to the
    longest common prefix of the next turn's prompt, as a chat front end keeps it."""

    def __init__(self, model, kv: Optional[KVOptions] = None):
        from mlx_lm.models.cache import make_prompt_cache

        self.cache = make_prompt_cache(model, (kv or KVOptions()).max_kv_size)
        self.tokens: List[int] = []

    def prompt(self, ids: List[int]) -> mx.array:
        """The part of `ids` the cache does not hold yet (at least the last token)."""
        from mlx_lm.models.cache import trim_prompt_cache

        p, m = 0, min(len(self.tokens), len(ids) - 1)
        while p < m and self.tokens[p] == ids[p]:
            p += 1
        trim_prompt_cache(self.cache, len(self.tokens) - p)
        self.tokens = list(ids)
        return mx.array(ids[p:])

    def answered(self, fed: List[int]) -> None:
        """The tokens generated after the prompt (every yielded one went through the model)."""
        self.tokens = (self.tokens + fed)[: self.cache[0].offset]


def bench(model, tokenizer, heads, prompts: List, *, max_tokens: int, drafts: List, temp: float = 0.0,
          loop: Optional[str] = None, seed: int = 0, progress: bool = True, draft="heads",
          stop_at_eos: bool = True, cluster=None, mode: str = "run", trees=("auto",),
          kv: Optional[KVOptions] = None) -> Dict:
    """drafts: draft lengths and/or 'auto'; `draft`: a source or a list of them (each
    length runs with each source); `trees`: --tree settings (parsed: 'auto', None
    for chains, widths), each length and source running with each.  `mode` (see MODES): how the requests follow one
    another.  An answer ends at the tokenizer's end-of-sequence token unless
    `stop_at_eos` is False.  Under mlx.launch (`cluster`), every rank runs the same
    benchmark on its shard; plain decoding is then mlx-lm's own on the sharded model.
    `kv`: mlx-lm's KV cache options, the same for plain mlx-lm and this engine."""
    from tqdm import tqdm

    from . import blas
    from .costs import seed_planner
    from .distributed import describe
    from .engine import DraftState
    from .prompts import chat_messages

    if mode not in MODES:
        raise MTPDError(f"unknown bench mode {mode!r}: choose from {', '.join(MODES)}")
    if mode == "warm" and cluster is not None:
        raise MTPDError("--mode warm is for one process: under mlx.launch use --mode run or cold")
    sources = [draft] if isinstance(draft, str) else list(draft)
    trees = list(trees)
    settings = [(d, src, tr) for tr in trees for src in sources for d in drafts]  # (num_draft, source, tree)

    def label(d, src, tr):
        name = f"D={d}" + (f",{src}" if len(sources) > 1 else "")
        if len(trees) > 1:
            name += ",chain" if tr is None else (",tree" if tr == "auto" else ",tree=" + "-".join(map(str, tr)))
        return name

    names = ["plain"] + [label(*x) for x in settings]
    setting_of = dict(zip(names[1:], settings))
    eos = set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id]) if stop_at_eos else set()

    def new_planner(src, tr):
        planner = DraftPlanner("auto", src if heads is not None or src == "prompt-lookup" else "prompt-lookup",
                               tree=tr)
        if cluster is None:  # as a fresh process starts: from the cached costs and the head set's evaluation
            seed_planner(planner, model, tokenizer, heads)
        return planner

    planners = {n: new_planner(src, tr) for n, (d, src, tr) in setting_of.items() if d == "auto"}
    # warm: one conversation per setting (T > 0: the answers, so the conversations, differ)
    convs = {n: [] for n in names}
    states = {n: None for n in names[1:]}
    plain_conv = PlainConversation(model, kv) if mode == "warm" else None
    totals = {n: {"tokens": 0, "time": 0.0, "decode_tokens": 0, "decode_time": 0.0} for n in names}
    stats = {n: SpecStats() for n in names[1:]}
    mismatches = []
    per_prompt = []
    first_steps: Dict[str, List[str]] = {n: [] for n in names[1:]}
    warm_ids = mx.array(tokenizer.apply_chat_template(chat_messages(prompts[0]), add_generation_prompt=True))
    _run(_plain(warm_ids, model, 4, 0.0))  # warm-up
    leader = cluster is None or cluster.leader
    bar = tqdm(total=len(prompts) * len(names), desc=f"bench ({mode})", unit="run",
               disable=not progress or not leader)
    for i, prompt in enumerate(prompts):
        order = names if i % 2 == 0 else names[::-1]
        outs = {}
        row = {"prompt": i}
        for name in order:
            msgs = convs[name] + chat_messages(prompt) if mode == "warm" else chat_messages(prompt)
            ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
            row.setdefault("prompt_tokens", {})[name] = len(ids)
            mx.random.seed(seed + i)
            fed: List[int] = []
            if name == "plain":
                p = plain_conv.prompt(ids) if plain_conv is not None else mx.array(ids)
                toks, t, td = _run(_plain(p, model, max_tokens, temp,
                                          plain_conv.cache if plain_conv is not None else None, kv), eos, fed)
                if plain_conv is not None:
                    plain_conv.answered(fed)
            else:
                d, src, tr = setting_of[name]
                if d == "auto" and mode == "cold":
                    planners[name] = new_planner(src, tr)
                if mode == "warm" and states[name] is None and d != 0:
                    depth = planners[name].num_draft if d == "auto" else d
                    uses_heads = heads is not None and src != "prompt-lookup"
                    states[name] = DraftState(model, heads if uses_heads else None, depth if uses_heads else 0,
                                              loop, kv)
                st = SpecStats()
                toks, t, td = _run(mtp_generate_step(mx.array(ids), model, heads if d else None, num_draft=d,
                                                     loop=loop, max_tokens=max_tokens, temp=temp, stats=st,
                                                     draft=src, planner=planners.get(name), tree=tr,
                                                     state=states[name] if mode == "warm" else None,
                                                     cluster=cluster, kv=kv), eos)
                stats[name].add(st)
                if st.first_step:
                    first_steps[name].append(st.first_step)
            if mode == "warm":
                convs[name] = msgs
            outs[name] = toks
            row[name] = {"tokens": len(toks), "seconds": t, "decode_seconds": td}
            tot = totals[name]
            tot["tokens"] += len(toks)
            tot["time"] += t
            tot["decode_tokens"] += max(len(toks) - 1, 0)
            tot["decode_time"] += td
            bar.update(1)
        if mode == "warm":  # each setting's own answer, or at T > 0 plain mlx-lm's for all (see above)
            for name in names:
                said = outs["plain"] if temp > 0 else outs[name]
                convs[name] = convs[name] + [{"role": "assistant", "content": tokenizer.decode(said)}]
            if temp > 0:
                # A chat's caches hold its own answers: here the history is plain mlx-lm's, which
                # its cache holds, so each setting's state takes it in too, untimed (else the next
                # turn would prefill plain mlx-lm's answer for the engine alone).
                for name, st in states.items():
                    if st is not None:
                        d, src, tr = setting_of[name]
                        _run(mtp_generate_step(mx.array(plain_conv.tokens), model, heads, num_draft=d, loop=loop,
                                               max_tokens=1, draft=src, planner=planners.get(name), tree=tr,
                                               state=st, kv=kv), set())
        per_prompt.append(row)
        if temp == 0:
            mismatches += [{"prompt": i, "setting": n} for n in names[1:] if outs[n] != outs["plain"]]
    bar.close()
    plain = totals["plain"]
    per_d = {}
    for name in names[1:]:
        t, s = totals[name], stats[name]
        d, src, tr = setting_of[name]
        per_d[name] = {
            "num_draft": d,
            "draft": src,
            "tree": tr if tr is None or tr == "auto" else list(tr),
            "tree_steps": s.tree_steps,
            "tree_hits": s.tree_hits,
            "tokens_per_s": t["tokens"] / t["time"],
            "decode_tokens_per_s": t["decode_tokens"] / max(t["decode_time"], 1e-9),
            # throughput against plain decoding's in the same run: at T > 0 (or with an end-of-sequence
            # stop) the two answers differ in length; greedy answers are identical, so this is the time ratio
            "speedup": (t["tokens"] / t["time"]) / (plain["tokens"] / plain["time"]),
            "mean_accepted_length": s.mean_accepted_length,
            "acceptance_by_position": s.cumulative_acceptance,
            "acceptance_rates": s.acceptance_rates,
            "steps_by_source": dict(s.sources),
            # what each answer's first step after its first token was (a cold planner that knows
            # nothing decodes plainly first)
            "first_steps": {k: first_steps[name].count(k) for k in sorted(set(first_steps[name]))},
            # the suffix-match check after each plainly decoded token: its share of the run's time
            "match_checks": s.match_checks,
            "match_check_us": 1e6 * s.match_check_time / max(s.match_checks, 1),
            "match_check_share": s.match_check_time / max(t["time"], 1e-9),
        }
    # The headline is `auto` when it ran (what users get), else the best fixed D.
    autos = [r for r in per_d.values() if r["num_draft"] == "auto"]
    best = autos[-1] if autos else max(per_d.values(), key=lambda r: r["speedup"])
    return {
        "plain_tokens_per_s": plain["tokens"] / plain["time"],
        "plain_decode_tokens_per_s": plain["decode_tokens"] / max(plain["decode_time"], 1e-9),
        "mtp_tokens_per_s": best["tokens_per_s"],
        "speedup": best["speedup"],
        "num_draft": best["num_draft"],
        "mean_accepted_length": best["mean_accepted_length"],
        "acceptance_by_position": best["acceptance_by_position"],
        "identical_outputs": (not mismatches) if temp == 0 else None,
        "mismatches": mismatches,
        "num_prompts": len(prompts),
        "max_tokens": max_tokens,
        "temp": temp,
        "draft": draft if isinstance(draft, str) else ",".join(sources),
        "mode": mode,
        "stop_at_eos": stop_at_eos,
        "device": str(mx.default_device()),
        "blas": blas.describe(),
        "ranks": cluster.size if cluster is not None else 1,
        "sharding": describe(model) if cluster is not None else None,
        # host round trips by which the ranks agreed (a plan per step), and their mean cost
        "agreements": cluster.sync_count if cluster is not None else 0,
        "agreement_ms": 1e3 * cluster.sync_time / max(cluster.sync_count, 1) if cluster is not None else 0.0,
        "by_num_draft": per_d,
        "per_prompt": per_prompt,
    }


def plot(result: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = result["by_num_draft"]
    rows = sorted((r for r in by.values() if r["num_draft"] != "auto" and r.get("draft") == result["draft"]
                   .split(",")[0]), key=lambda r: r["num_draft"])
    autos = [(name, r) for name, r in by.items() if r["num_draft"] == "auto"]
    title = f"{result['num_prompts']} prompts, T = {result['temp']:g}, {result['device']}"
    if not rows:  # `auto` only: one bar per setting beside plain mlx-lm
        fig, ax = plt.subplots(figsize=(6.5, 4))
        labels = ["plain mlx-lm"] + [r.get("draft", name) + " (auto)" for name, r in autos]
        values = [result["plain_tokens_per_s"]] + [r["tokens_per_s"] for _, r in autos]
        bars = ax.bar(labels, values, color=["gray"] + [f"C{i}" for i in range(len(autos))])
        for b, (_, r) in zip(bars[1:], autos):
            ax.annotate(f"{r['speedup']:.2f}x, tau {r['mean_accepted_length']:.2f}",
                        (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set(ylabel="tokens/s", title=f"{result.get('mode', 'run')}: {title}")
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    d = [r["num_draft"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(d, [r["tokens_per_s"] for r in rows], "o-", label="this engine, fixed D")
    ax.axhline(result["plain_tokens_per_s"], color="gray", ls="--", label="plain mlx-lm")
    for i, (name, r) in enumerate(autos):
        ax.axhline(r["tokens_per_s"], color=f"C{i + 2}", ls="-.", label=f"this engine, {name}")
    ax.set(xlabel="draft length D", ylabel="tokens/s", title=title)
    ax.set_xticks(d)
    ax2 = ax.twinx()
    ax2.plot(d, [r["mean_accepted_length"] for r in rows], "s:", color="C1", label="tau")
    ax2.set_ylabel("mean accepted length tau")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markers(res: Dict, tag: Optional[str] = None):
    tag = tag or ("greedy" if res["temp"] == 0 else f"temp-{res['temp']:g}")
    return f"<!-- bench:{tag}:begin -->", f"<!-- bench:{tag}:end -->"


def results_table(res: Dict, command: str) -> str:
    lines = [
        f"`{command}` on {res['device']} ({res['blas']}), {res['num_prompts']} prompts x {res['max_tokens']} "
        f"tokens{' at most (an answer ends at its end-of-sequence token)' if res.get('stop_at_eos') else ''}, "
        f"temperature {res['temp']}, "
        f"draft source {res['draft']}, requests {MODE_TEXT[res.get('mode', 'run')]}"
        + (" (the same conversation for every setting: plain mlx-lm's answers as its history)"
           if res.get("mode") == "warm" and res.get("temp") else "") + ":",
        "",
        "| setting | tokens/s | speedup vs plain mlx-lm | tau | acceptance by position | steps by source "
        "| first step after the first token |",
        "|---|---|---|---|---|---|---|",
        f"| plain mlx-lm | {res['plain_tokens_per_s']:.2f} | 1.000x | 1.00 | - | - | - |",
    ]
    for name, r in res["by_num_draft"].items():
        acc = r["acceptance_by_position"]
        acc = " ".join(f"{x:.2f}" for x in acc[:8]) + (f" ... ({len(acc)} positions)" if len(acc) > 8 else "")
        src = ", ".join(f"{k} {v}" for k, v in sorted(r["steps_by_source"].items())) or "-"
        first = ", ".join(f"{k} {v}" for k, v in sorted(r.get("first_steps", {}).items())) or "-"
        lines.append(f"| {name} | {r['tokens_per_s']:.2f} | {r['speedup']:.3f}x | "
                     f"{r['mean_accepted_length']:.2f} | {acc or '-'} | {src} | {first} |")
    if res["identical_outputs"] is not None:
        lines += ["", f"Greedy outputs identical to plain mlx-lm: {'yes' if res['identical_outputs'] else 'NO'}."]
    return "\n".join(lines)


def update_readme(path: Path, res: Dict, command: str, tag: Optional[str] = None) -> None:
    """Replace the text between the bench markers `tag` (default: of this temperature), atomically."""
    text = path.read_text()
    BEGIN, END = _markers(res, tag)
    if BEGIN not in text or END not in text:
        raise MTPDError(f"{path} has no {BEGIN} ... {END} markers: add them where the table goes")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(head + BEGIN + "\n" + results_table(res, command) + "\n" + END + tail)
    tmp.replace(path)


def main(argv=None) -> None:
    from .errors import run_main

    p = argparse.ArgumentParser(prog="mlx_mtpd bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--heads", default=None,
                   help="Head set (default: the model's own); 'untrained' makes one untrained head.")
    p.add_argument("--prompts", default=str(BENCH_PROMPTS),
                   help="JSONL with 'prompt' or 'messages' per line; 'edits' = the shipped conversations whose "
                        "last answer edits or repeats an earlier one; 'chat' = the shipped chat requests.")
    p.add_argument("--num-prompts", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--num-draft", default="1,2,3,auto",
                   help="Draft lengths and/or 'auto', comma-separated; 0 = this engine's plain loop.")
    p.add_argument("--draft", default="heads",
                   help="Draft source: heads, prompt-lookup or heads+lookup, or several comma-separated "
                        "(each draft length runs with each; default heads).")
    p.add_argument("--tree", nargs="+", default=["auto"],
                   help="Head drafts as trees: auto (default), off, W or W1,W2,... (/F: branches below depth 1's "
                        "alternatives); several values run "
                        "each setting with each (e.g. --tree auto off).")
    p.add_argument("--mode", choices=MODES, default="run",
                   help="run: each request alone, one planner for the run (default); cold: each with a fresh "
                        "planner, as a new process; warm: the requests as the turns of one chat session.")
    p.add_argument("--readme", default=None,
                   help="Rewrite the results table between the bench markers of this Markdown file.")
    p.add_argument("--table", default=None,
                   help="Name of the README table to rewrite (default: 'greedy' or 'temp-T').")
    p.add_argument("--loop", choices=("last", "cycle"), default=None)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true",
                   help="Decode --max-tokens tokens for every prompt, past the end-of-sequence token.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    from .distributed import add_args

    add_kv_args(p)
    add_args(p)
    args = p.parse_args(argv)

    def run():
        from . import distributed
        from .prompts import read_prompts
        from .heads import init_heads

        try:
            drafts = [x.strip() if x.strip() == "auto" else int(x) for x in args.num_draft.split(",")]
        except ValueError:
            raise MTPDError(
                f"--num-draft must be integers or 'auto', comma-separated (got {args.num_draft!r})") from None
        if any(d != "auto" and d < 0 for d in drafts):
            raise MTPDError(f"--num-draft values must be >= 0 (got {args.num_draft!r})")
        sources = [x.strip() for x in args.draft.split(",") if x.strip()]
        bad = [x for x in sources if x not in ("heads", "prompt-lookup", "heads+lookup")]
        if bad or not sources:
            raise MTPDError(f"--draft takes heads, prompt-lookup or heads+lookup, comma-separated "
                            f"(got {args.draft!r})")
        from .tree import parse_tree

        trees = [parse_tree(x) for x in args.tree]
        untrained = args.heads == "untrained"
        cluster = distributed.setup(args)
        if untrained and cluster is not None:
            raise MTPDError("--heads untrained is for one process: under mlx.launch give a head set folder")
        if untrained:  # made below: nothing to load
            args.heads = None
        model, tok, heads = distributed.load_for(args, cluster)
        if untrained:
            heads = init_heads(model, 1, draft_vocab=8192)
        if heads is None and sources != ["prompt-lookup"] and any(d != "auto" and d for d in drafts):
            raise MTPDError("no head set: pass --heads (or --heads untrained), or --draft prompt-lookup")
        prompts = read_prompts(NAMED_PROMPTS.get(args.prompts, args.prompts))[: args.num_prompts]
        res = bench(model, tok, heads, prompts, max_tokens=args.max_tokens, drafts=drafts, temp=args.temp,
                    loop=args.loop, seed=args.seed, draft=sources if len(sources) > 1 else sources[0],
                    stop_at_eos=not args.ignore_eos, cluster=cluster, mode=args.mode, trees=trees,
                    kv=KVOptions.from_args(args))
        if cluster is not None and not cluster.leader:
            return
        print(f"device {res['device']}, BLAS: {res['blas']}, {res['num_prompts']} prompts, temp {args.temp}"
              + (f", {res['ranks']} ranks ({res['sharding']} parallel; agreeing on a plan: "
                 f"{res['agreement_ms']:.2f} ms each)" if cluster is not None else ""))
        print(f"plain mlx-lm: {res['plain_tokens_per_s']:.2f} tokens/s")
        for name, r in res["by_num_draft"].items():
            print(f"{name:<5} {r['tokens_per_s']:7.2f} tokens/s  speedup {r['speedup']:.3f}x  "
                  f"tau {r['mean_accepted_length']:.2f}  steps {r['steps_by_source']}  first {r['first_steps']}"
                  + (f"  trees {r['tree_steps']} (alternative accepted in {r['tree_hits']})"
                     if r["tree_steps"] else "")
                  + (f"  match checks {r['match_checks']} x {r['match_check_us']:.0f} us "
                     f"({100 * r['match_check_share']:.3f}% of the time)" if r["match_checks"] else ""))
        if args.temp == 0:
            print("greedy outputs identical:", "yes" if res["identical_outputs"] else f"no {res['mismatches']}")
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2))
        if args.plot:
            plot(res, Path(args.plot))
        if args.readme:
            update_readme(Path(args.readme), res, " ".join(["mlx_mtpd bench"] + list(argv or sys.argv[1:])),
                          args.table)
        print(f"best: D={res['num_draft']} speedup {res['speedup']:.3f}x", file=sys.stderr)

    run_main("bench", run)
