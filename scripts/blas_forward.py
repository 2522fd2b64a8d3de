"""What one backbone forward costs under the BLAS library bound to MLX's CPU matmuls.

The default model with a warm cache of 300 positions: a forward over n tokens
(evaluated alone, median of 30), plain decoding pipelined as mlx-lm does
(the next forward queued before the current token is read), a prefill of 64 and
300 tokens, and one decoding step of a batch of 8 rows.  Run it once per library:

    python scripts/blas_forward.py                                                  # OpenBLAS (the default)
    MLX_MTPD_BLAS=/usr/lib/x86_64-linux-gnu/blis-pthread/libblis.so.4 python scripts/blas_forward.py

A verification of n tokens is worth drafting for when its cost over one
token's is small: that ratio, not the library's speed alone, decides whether
the heads pay on a device.
"""

from __future__ import annotations

import argparse
import json
import time

import mlx_mtpd  # noqa: F401  (binds the BLAS first)
import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from mlx_mtpd.blas import describe
from mlx_mtpd.utils import load


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model, _, _ = load(None)
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([list(range(100, 400))], mx.uint32), cache=cache))

    def forward_ms(n: int) -> float:
        y = mx.array([[5] * n], mx.uint32)
        times = []
        for _ in range(args.reps):
            tic = time.perf_counter()
            out = model(y, cache=cache)
            mx.eval(out - mx.logsumexp(out, axis=-1, keepdims=True))
            times.append(time.perf_counter() - tic)
            for c in cache:
                c.trim(n)
        return 1e3 * median(times)

    out = {"blas": describe(), "forward_ms": {n: forward_ms(n) for n in (1, 2, 3, 4, 8)}}
    y = mx.argmax(model(mx.array([[5]], mx.uint32), cache=cache)[0, -1])
    mx.async_eval(y)
    tic = time.perf_counter()
    for _ in range(40):
        nxt = mx.argmax(model(y.reshape(1, 1).astype(mx.uint32), cache=cache)[0, -1])
        mx.async_eval(nxt)
        y.item()
        y = nxt
    y.item()
    out["pipelined_plain_ms"] = 1e3 * (time.perf_counter() - tic) / 40
    for c in cache:
        c.trim(41)
    out["prefill_ms"] = {}
    for n in (64, 300):
        times = []
        for _ in range(5):
            tic = time.perf_counter()
            mx.eval(model(mx.array([[7] * n], mx.uint32), cache=cache))
            times.append(time.perf_counter() - tic)
            for c in cache:
                c.trim(n)
        out["prefill_ms"][n] = 1e3 * min(times)
    batch = make_prompt_cache(model)
    mx.eval(model(mx.array([list(range(100, 400))] * 8, mx.uint32), cache=batch))
    times = []
    for _ in range(10):
        tic = time.perf_counter()
        mx.eval(model(mx.array([[5]] * 8, mx.uint32), cache=batch))
        times.append(time.perf_counter() - tic)
        for c in batch:
            c.trim(1)
    out["batch8_step_ms"] = 1e3 * median(times)
    f = out["forward_ms"]
    print(f"{out['blas']}\n  forward of n tokens (ms): " + ", ".join(f"{n}: {t:.1f}" for n, t in f.items())
          + "\n  n tokens over one: " + ", ".join(f"{n}: {t / f[1]:.2f}" for n, t in f.items() if n > 1)
          + f"\n  pipelined plain decoding: {out['pipelined_plain_ms']:.1f} ms a token"
          + f"\n  prefill 64 / 300 tokens: {out['prefill_ms'][64]:.0f} / {out['prefill_ms'][300]:.0f} ms"
          + f"\n  a batch of 8 rows, one step: {out['batch8_step_ms']:.1f} ms")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
