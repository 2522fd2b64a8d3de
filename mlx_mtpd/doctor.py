"""`mlx_mtpd doctor`: which BLAS MLX uses, how fast it multiplies, where models live."""

from __future__ import annotations

import argparse
import platform
import time

from . import _blas


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

    from .utils import home

    lines = [
        f"platform: {platform.system()} {platform.machine()}, python {platform.python_version()}",
        f"mlx: {mx.__version__}, device: {mx.default_device()}",
        f"BLAS: {_blas.describe()}",
        f"matmul 1024x1024 float32: {matmul_gflops():.1f} GFLOP/s",
        f"model cache: {home()}",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    argparse.ArgumentParser(prog="mlx_mtpd doctor", description=__doc__).parse_args(argv)
    print(report())
