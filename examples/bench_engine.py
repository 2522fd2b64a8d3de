"""The engine's overhead, in one run: plain mlx-lm decoding against this loop
with D = 0 (the cost of the code path) and with untrained heads at D = 1..5
(the cost of drafting when nothing is accepted).  Rounds alternate between the
settings to cancel drift.

    python examples/bench_engine.py [--model M] [--max-tokens 64] [--rounds 3]
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


def timed(gen):
    """Decode time after the first token (prompt processing excluded)."""
    n, start = 0, None
    for n, _ in enumerate(gen):
        if n == 0:
            start = time.perf_counter()
    return n, time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--draft-vocab", type=int, default=8192)
    ap.add_argument("--json", default=None, help="Write the figures here too.")
    args = ap.parse_args()

    model, tok, _ = mlx_mtpd.load(args.model)
    heads = init_heads(model, 1, draft_vocab=args.draft_vocab)
    prompts = [
        mx.array(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True))
        for p in PROMPTS
    ]
    settings = {"mlx_lm": None, "D=0": 0, **{f"D={d}": d for d in range(1, 6)}}
    totals = {k: [0, 0.0] for k in settings}
    timed(generate_step(prompts[0], model, max_tokens=8))  # warm-up
    for r in range(args.rounds):
        for p in prompts:
            for name, d in settings.items():
                if d is None:
                    n, t = timed(generate_step(p, model, max_tokens=args.max_tokens))
                else:
                    n, t = timed(mtp_generate_step(p, model, heads if d else None, num_draft=d,
                                                   max_tokens=args.max_tokens, stats=SpecStats()))
                totals[name][0] += n
                totals[name][1] += t
    base = totals["mlx_lm"][0] / totals["mlx_lm"][1]
    result = {"device": str(mx.default_device()), "blas": _blas.describe(), "tokens_per_s": {}}
    print(f"device {mx.default_device()}, BLAS: {_blas.describe()}")
    print(f"{'setting':<8} {'tokens/s':>9} {'vs mlx_lm':>10}")
    for name, (n, t) in totals.items():
        tps = n / t
        result["tokens_per_s"][name] = tps
        print(f"{name:<8} {tps:9.2f} {tps / base:9.3f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
