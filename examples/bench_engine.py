"""Decoding speed in one run: plain mlx-lm against this loop with D = 0 (the
cost of the code path) and with heads at D = 1..5 (untrained heads by default:
the cost of drafting when nothing is accepted; --heads for trained ones).
Settings alternate per prompt to cancel drift; greedy outputs are checked
against mlx-lm's.

    python examples/bench_engine.py [--model M] [--heads H] [--max-tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import time

import mlx_mtpd  # binds OpenBLAS first
import mlx.core as mx
from mlx_lm.generate import generate_step

from mlx_mtpd import _blas
from mlx_mtpd.engine import SpecStats, mtp_generate_step
from mlx_mtpd.heads import init_heads

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain how a rainbow forms.",
    "Give three tips for a good night's sleep.",
]


def timed(gen, out=None):
    """Decode time after the first token (prompt processing excluded)."""
    n, start = 0, None
    for n, item in enumerate(gen):
        if n == 0:
            start = time.perf_counter()
        if out is not None:
            out.append(int(item[0]))
    return n, time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--draft-vocab", type=int, default=8192)
    ap.add_argument("--heads", default=None, help="A trained head set (default: untrained heads).")
    ap.add_argument("--num-draft", default="1,2,3,4,5", help="Draft lengths to measure.")
    ap.add_argument("--prompts", default=None, help="A .jsonl of prompts (default: three built in).")
    ap.add_argument("--json", default=None, help="Write the figures here too.")
    args = ap.parse_args()

    model, tok, heads = mlx_mtpd.load(args.model, heads=args.heads)
    if args.heads is None:
        heads = init_heads(model, 1, draft_vocab=args.draft_vocab)
    texts = PROMPTS
    if args.prompts:
        from mlx_mtpd.gen_data import read_prompts

        texts = [p for p in read_prompts(args.prompts) if isinstance(p, str)]
    prompts = [
        mx.array(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True))
        for p in texts
    ]
    drafts = [int(x) for x in args.num_draft.split(",")]
    settings = {"mlx_lm": None, "D=0": 0, **{f"D={d}": d for d in drafts}}
    taus = {k: SpecStats() for k in settings}
    totals = {k: [0, 0.0] for k in settings}
    timed(generate_step(prompts[0], model, max_tokens=8))  # warm-up
    mismatches = []
    for _ in range(args.rounds):
        for pi, p in enumerate(prompts):
            ref = []
            for name, d in settings.items():
                got = []
                if d is None:
                    n, t = timed(generate_step(p, model, max_tokens=args.max_tokens), ref)
                else:
                    st = SpecStats()
                    n, t = timed(mtp_generate_step(p, model, heads if d else None, num_draft=d,
                                                   max_tokens=args.max_tokens, stats=st), got)
                    if got != ref:
                        mismatches.append((pi, name))
                    taus[name].rounds += st.rounds
                    taus[name].accepted = [a + b for a, b in
                                           zip(taus[name].accepted + [0] * 8, st.accepted + [0] * 8)]
                totals[name][0] += n
                totals[name][1] += t
    base = totals["mlx_lm"][0] / totals["mlx_lm"][1]
    result = {"device": str(mx.default_device()), "blas": _blas.describe(), "tokens_per_s": {},
              "identical_outputs": not mismatches, "mismatches": mismatches}
    print(f"device {mx.default_device()}, BLAS: {_blas.describe()}")
    result["mean_accepted_length"] = {}
    print(f"{'setting':<8} {'tokens/s':>9} {'vs mlx_lm':>10} {'tau':>6}")
    for name, (n, t) in totals.items():
        tps = n / t
        tau = taus[name].mean_accepted_length
        result["tokens_per_s"][name] = tps
        result["mean_accepted_length"][name] = tau
        print(f"{name:<8} {tps:9.2f} {tps / base:9.3f}x {tau:6.2f}")
    print("greedy outputs identical to mlx-lm:", "yes" if not mismatches else f"no: {mismatches}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
