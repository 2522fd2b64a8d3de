"""The file helpers every module uses: the cache folder, atomic output folders
and JSON files, the head set's file names, the default float type.  Nothing of
the package's is imported here but its errors (so any module may import this)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import mlx.core as mx

from .errors import MTPDError

HEADS_WEIGHTS = "mtp_heads.safetensors"
HEADS_CONFIG = "mtp_config.json"
EVAL_FILE = "eval.json"  # a head set's evaluation, beside its weights (eval-heads --save, train --export)


def home() -> Path:
    """Where imported models live: $MLX_MTPD_HOME or ~/.cache/mlx_mtpd."""
    env = os.environ.get("MLX_MTPD_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mlx_mtpd"


def on_gpu() -> bool:
    return mx.default_device() == mx.gpu


def default_dtype() -> str:
    # MLX's quantized and half-precision matmuls have no fast CPU path; on a
    # GPU (Metal, CUDA) decoding is memory-bound and half precision wins.
    return "bfloat16" if on_gpu() else "float32"


@contextlib.contextmanager
def atomic_dir(dest: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `dest`, renamed to `dest` on success.

    On any failure (including KeyboardInterrupt) the temporary folder is removed,
    so nothing half-written is left behind.
    """
    dest = Path(dest)
    if dest.exists() and not force:
        raise MTPDError(f"{dest} already exists: choose another path or pass --force")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; a model folder is not
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
