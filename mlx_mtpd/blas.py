"""Bind a system OpenBLAS before MLX loads, so MLX's CPU matmuls use it.

`mlx[cpu]` on Linux links the netlib reference BLAS (about 3 GFLOP/s for a
1024x1024 float32 matmul on a laptop-class core).  Loading an optimised library
that exports the same `cblas_*` symbols with RTLD_GLOBAL *before* `mlx.core` is
first imported makes the dynamic linker resolve MLX's calls to it instead.

Control with the environment:
  MLX_MTPD_BLAS=0             never bind anything
  MLX_MTPD_BLAS=/path/lib.so  bind this library (an error if it cannot load)
  unset                       bind the first system OpenBLAS found, if any
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Optional

# Debian/Ubuntu multiarch locations first (libopenblas0-pthread), then generic ones.
_CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
)

# What happened, for `mlx_mtpd doctor` and `--verbose`.
state = {"library": None, "reason": "not attempted"}
_handle: Optional[ctypes.CDLL] = None


def _arch() -> str:
    return os.uname().machine


def find_openblas() -> Optional[str]:
    for pattern in _CANDIDATES:
        path = pattern.format(arch=_arch())
        if os.path.exists(path):
            return path
    return None


def bind() -> dict:
    """Bind a BLAS library once; safe to call many times. Returns `state`."""
    global _handle
    if _handle is not None or state["reason"] != "not attempted":
        return state
    choice = os.environ.get("MLX_MTPD_BLAS", "").strip()
    if not sys.platform.startswith("linux"):
        state["reason"] = "not Linux: MLX uses Accelerate/Metal"
        return state
    if choice in ("0", "off", "none", "false"):
        state["reason"] = "disabled by MLX_MTPD_BLAS=0"
        return state
    if "mlx.core" in sys.modules:
        state["reason"] = "mlx.core was imported before mlx_mtpd: too late to bind"
        return state
    path = choice or find_openblas()
    if path is None:
        state["reason"] = (
            "no system OpenBLAS found (apt-get install libopenblas0-pthread)"
        )
        return state
    try:
        _handle = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        state["reason"] = f"could not load {path}: {e}"
        if choice:  # asked for explicitly: say so, once, and carry on without it
            print(
                f"mlx_mtpd: warning: MLX_MTPD_BLAS={choice!r} cannot be loaded; "
                "using MLX's bundled BLAS (point it at a libopenblas.so or set MLX_MTPD_BLAS=0)",
                file=sys.stderr,
            )
        return state
    state["library"] = path
    state["reason"] = "bound before mlx.core was imported"
    return state


def describe() -> str:
    if state["library"]:
        name = "OpenBLAS" if "openblas" in state["library"].lower() else "BLAS"
        return f"{name} ({state['library']})"
    return f"MLX's bundled BLAS ({state['reason']})"
