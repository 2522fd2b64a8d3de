"""Paired A/B of the heads' draft temperature: sampled chat answers with the head
set drafting at its measured draft temperature (eval.json's `draft_temperature`)
against the same head set drafting at the backbone's temperature, and plain mlx-lm.

Each chat request is answered by the three in an order that changes from request
to request (the machine's drift falls on all alike), each with its own fresh
seeded `auto` planner (a cold request); ratios are pooled tokens per second
against plain mlx-lm's, with tau and the steps each took.

    python scripts/draft_temp_ab.py --temp 0.7 --num-prompts 12 [--draft heads]
"""

from __future__ import annotations

import argparse

import mlx_mtpd  # noqa: F401  (binds OpenBLAS first)
import mlx.core as mx

from mlx_mtpd.bench import CHAT_PROMPTS, _plain, _run
from mlx_mtpd.costs import seed_planner
from mlx_mtpd.engine import SpecStats, mtp_generate_step
from mlx_mtpd.planner import DraftPlanner
from mlx_mtpd.prompts import chat_messages, read_prompts
from mlx_mtpd.utils import load


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--temp", type=float, default=0.7)
    ap.add_argument("--num-prompts", type=int, default=12)
    ap.add_argument("--draft", default="heads")
    ap.add_argument("--max-tokens", type=int, default=256)
    args = ap.parse_args()
    model, tok, heads = load(None)
    if not heads.draft_scales:
        raise SystemExit("the head set has no measured draft temperature: run eval-heads --temp ... --save")
    measured = dict(heads.draft_scales)
    eos = set(tok.eos_token_ids)
    totals = {k: [0, 0.0] for k in ("plain", "measured", "backbone's")}
    stats = {k: SpecStats() for k in ("measured", "backbone's")}
    _run(_plain(mx.array(tok.encode("hello")), model, 4, 0.0))  # warm-up
    prompts = read_prompts(CHAT_PROMPTS)[: args.num_prompts]
    for i, p in enumerate(prompts):
        ids = mx.array(tok.apply_chat_template(chat_messages(p), add_generation_prompt=True))
        order = ["plain", "measured", "backbone's"]
        order = order[i % 3:] + order[: i % 3]
        for name in order:
            mx.random.seed(i)
            if name == "plain":
                gen = _plain(ids, model, args.max_tokens, args.temp)
            else:
                heads.draft_scales.clear()
                heads.draft_scales.update(measured if name == "measured" else {})
                planner = seed_planner(DraftPlanner("auto", args.draft), model, tok, heads, quiet=True)
                gen = mtp_generate_step(ids, model, heads, num_draft="auto", draft=args.draft, temp=args.temp,
                                        max_tokens=args.max_tokens, planner=planner, stats=stats[name])
            toks, _, decode_s = _run(gen, eos)
            totals[name][0] += max(len(toks) - 1, 0)
            totals[name][1] += decode_s
        rates = {k: n / s for k, (n, s) in totals.items() if s}
        print(f"{i + 1}/{len(prompts)}: " + ", ".join(
            f"{k} {rates[k] / rates['plain']:.3f}x" for k in ("measured", "backbone's")), flush=True)
    plain = totals["plain"][0] / totals["plain"][1]
    print(f"plain mlx-lm {plain:.2f} tok/s (decoding); draft temperature {measured}")
    for k in ("measured", "backbone's"):
        n, s = totals[k]
        st = stats[k]
        print(f"{k:>10}: {n / s / plain:.3f}x  tau {st.mean_accepted_length:.2f}  steps {dict(st.sources)}")


if __name__ == "__main__":
    main()
