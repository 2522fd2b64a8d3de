"""`mlx_mtpd doctor`: which BLAS MLX uses, how fast it multiplies, where models live, and (--costs)
the step costs the planner starts from."""

from __future__ import annotations

import argparse
import platform
import time

from . import blas


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Measured GFLOP/s of an n x n float32 matmul on the default device (best of `repeats`)."""
    import mlx.core as mx

    a = mx.random.normal((n, n), key=mx.random.key(0))
    b = mx.random.normal((n, n), key=mx.random.key(1))
    mx.eval(a, b, a @ b)
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - tic)
    return 2 * n**3 / best / 1e9


def report() -> str:
    import mlx.core as mx

    from .files import home

    lines = [
        f"platform: {platform.system()} {platform.machine()}, python {platform.python_version()}",
        f"mlx: {mx.__version__}, device: {mx.default_device()}",
        f"BLAS: {blas.describe()}",
        f"matmul 1024x1024 float32: {matmul_gflops():.1f} GFLOP/s",
        f"model cache: {home()}",
    ]
    return "\n".join(lines)


def cost_report(model_arg=None, heads_arg=None) -> str:
    """Measure (again) the step costs `--num-draft auto` starts from, for a model and
    its head set, keep them in the cache folder and describe them."""
    from .costs import cost_key, cost_path, step_costs
    from .utils import load

    model, tokenizer, heads = load(model_arg, heads=heads_arg)
    costs = step_costs(model, tokenizer, heads, force=True)
    t0 = costs["plain"]
    lines = [f"step costs ({cost_path(cost_key(model, heads))}), measured at a {costs['context_tokens']}-token "
             f"context in {costs['seconds_to_measure']:.1f} s:",
             f"  plain decoding: {1e3 * t0:.1f} ms a token ({1 / t0:.1f} tokens/s)"]
    for kind in ("heads", "lookup", "tree"):
        if costs.get(kind):
            name = "n" if kind == "tree" else "d"
            parts = ", ".join(f"{name}={d} {1e3 * t:.0f} ms ({t / t0:.2f})" for d, t in costs[kind].items())
            what = "tree step by nodes" if kind == "tree" else f"{kind} step"
            lines.append(f"  {what} (plain tokens): {parts}")
    return "\n".join(lines)


def main(argv=None) -> None:
    from .errors import run_main

    p = argparse.ArgumentParser(prog="mlx_mtpd doctor", description=__doc__)
    p.add_argument("--costs", action="store_true",
                   help="Also measure the step costs `--num-draft auto` starts from (for --model and its "
                        "heads, default: the default model) and keep them in the cache folder.")
    p.add_argument("--model", default=None, help="With --costs: the model (default: the default model).")
    p.add_argument("--heads", default=None, help="With --costs: its head set (default: the model's own).")
    args = p.parse_args(argv)

    def run():
        print(report())
        if args.costs:
            print(cost_report(args.model, args.heads))

    run_main("doctor", run)
