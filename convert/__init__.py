"""Checkpoint conversion to MLX model folders (`mlx_mtpd convert`).

Hugging Face checkpoints (local folder or hub id) and GGUF files become an MLX
folder that `mlx_lm.load` loads unchanged.  Output is built in a temporary
folder beside the destination and renamed at the end.
"""

from __future__ import annotations

import argparse
import glob
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from tqdm import tqdm

from mlx_mtpd.errors import MTPDError
from mlx_mtpd.files import HEADS_CONFIG, HEADS_WEIGHTS, atomic_dir, default_dtype

DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_HEAD_BITS = 8
# What a conversion needs from a hub repository (weights, head sets included).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]


def _model_class(config: Dict[str, Any]):
    from mlx_lm.utils import _get_classes

    try:
        return _get_classes(config)
    except ValueError as e:
        raise MTPDError(
            f"unknown architecture {config.get('model_type')!r} ({e}): "
            "mlx-lm has no model file for it; upgrade mlx-lm or pick another model"
        ) from None


def _cast(model: nn.Module, dtype: Optional[str]) -> None:
    if dtype is None:
        return
    target = getattr(mx, dtype)
    cast_predicate = getattr(model, "cast_predicate", lambda _: True)
    from mlx.utils import tree_map_with_path

    def cast(k, v):
        if cast_predicate(k) and mx.issubdtype(v.dtype, mx.floating):
            return v.astype(target)
        return v

    model.update(tree_map_with_path(cast, model.parameters()))


def _finish(
    model: nn.Module,
    config: Dict[str, Any],
    tokenizer_writer,
    out: Path,
    *,
    dtype: Optional[str],
    quantize: bool,
    q_bits: int,
    q_group_size: int,
    dequantize: bool,
    head_bits: int,
    heads_from: Optional[Path],
    force: bool,
    native_heads=None,
) -> Path:
    """Cast, (de)quantize and save `model` to `out` atomically."""
    from mlx_lm.utils import dequantize_model, quantize_model, save_config, save_model

    if quantize and dequantize:
        raise MTPDError("choose either -q/--quantize or --dequantize, not both")
    if quantize and "quantization" in config:
        raise MTPDError("the model is already quantized: pass --dequantize first")
    _cast(model, dtype)
    if dtype is not None:
        config["torch_dtype"] = dtype
    if quantize:
        model, config = quantize_model(model, config, q_group_size, q_bits)
    if dequantize:
        config.pop("quantization", None)
        config.pop("quantization_config", None)
        model = dequantize_model(model)
    with atomic_dir(out, force=force) as tmp:
        save_model(tmp, model, donate_model=True)
        save_config(config, config_path=tmp / "config.json")
        tokenizer_writer(tmp)
        if heads_from is not None:
            _copy_heads(heads_from, tmp, quantize, head_bits, q_group_size)
        elif native_heads is not None:
            _write_heads(native_heads, tmp, quantize, head_bits, q_group_size, dtype)
    return Path(out)


def _copy_heads(src: Path, dst: Path, quantize: bool, head_bits: int, group_size: int):
    """Carry a head set across; heads are never quantized below `head_bits`."""
    from mlx_mtpd.heads import quantize_head_file

    shutil.copy(src / HEADS_CONFIG, dst / HEADS_CONFIG)
    if quantize:
        quantize_head_file(src, dst, bits=head_bits, group_size=group_size)
    else:
        shutil.copy(src / HEADS_WEIGHTS, dst / HEADS_WEIGHTS)


def _fetch(hf_path: str, revision: Optional[str] = None) -> Path:
    """A local folder, or a hub id downloaded with huggingface_hub."""
    path = Path(hf_path).expanduser()
    if path.exists():
        return path
    if hf_path.count("/") != 1 or hf_path.startswith((".", "/", "~")):
        raise MTPDError(f"{hf_path} not found: give a checkpoint folder or a hub id org/name")
    import huggingface_hub

    try:
        return Path(
            huggingface_hub.snapshot_download(hf_path, revision=revision, allow_patterns=HUB_PATTERNS)
        )
    except Exception as e:
        raise MTPDError(f"cannot download {hf_path} from the hub ({type(e).__name__}: {e})") from None


def _check_checkpoint(path: Path) -> Dict[str, Any]:
    if not path.is_dir():
        raise MTPDError(f"{path} is not a folder: use --gguf for a .gguf file")
    if not (path / "config.json").exists():
        raise MTPDError(f"{path} is not a checkpoint (no config.json)")
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise MTPDError(f"{path / 'config.json'} is not valid JSON ({e})") from None
    files = glob.glob(str(path / "*.safetensors"))
    if not [f for f in files if Path(f).name != HEADS_WEIGHTS]:
        raise MTPDError(
            f"{path} is not a checkpoint (no *.safetensors weights; .bin/.pt need "
            "converting to safetensors first)"
        )
    for f in files:
        try:
            mx.load(f)  # reads the header and checks every offset against the size
        except Exception as e:
            raise MTPDError(f"{f} is truncated or corrupt ({e}): download it again") from None
    return config


def convert_hf(
    hf_path: str,
    mlx_path: str,
    *,
    revision: Optional[str] = None,
    dtype: Optional[str] = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    dequantize: bool = False,
    head_bits: int = DEFAULT_HEAD_BITS,
    force: bool = False,
    mtp: bool = True,
    mtp_only: bool = False,
    mtp_hidden: Optional[str] = None,
) -> Path:
    """Convert a Hugging Face checkpoint; its native MTP layers, if any, become
    a head set beside the backbone (`mtp=False` skips them; `mtp_only` writes
    just the head set into an already converted backbone folder)."""
    from mlx_lm.utils import load_model, load_tokenizer

    if mtp_only:
        return _mtp_only(hf_path, mlx_path, revision, head_bits, mtp_hidden)
    _check_out(mlx_path, force)
    src = _fetch(hf_path, revision)
    config = _check_checkpoint(src)
    _model_class(config)
    raw_config = dict(config)
    # mlx-lm's loader applies the architecture's sanitize() (HF -> MLX names).
    from .native_mtp import classes_without_mtp

    try:
        model, config = load_model(src, lazy=True, get_model_classes=classes_without_mtp)
    except (ValueError, KeyError) as e:
        raise MTPDError(f"cannot load {src} as a {config.get('model_type')} model: {e}") from None
    tokenizer = load_tokenizer(src, eos_token_ids=config.get("eos_token_id"))
    if dtype is None:
        dtype = config.get("torch_dtype") if config.get("torch_dtype") in DTYPES else None

    def write_tokenizer(tmp: Path):
        tokenizer.save_pretrained(tmp)
        for p in ("*.py", "generation_config.json"):
            for f in glob.glob(str(src / p)):
                shutil.copy(f, tmp)

    heads = src if (src / HEADS_CONFIG).exists() else None
    native = _native_heads(src, raw_config, model, mtp_hidden) if mtp and heads is None else None
    return _finish(
        model, config, write_tokenizer, Path(mlx_path), dtype=dtype, quantize=quantize,
        q_bits=q_bits, q_group_size=q_group_size, dequantize=dequantize,
        head_bits=head_bits, heads_from=heads, force=force, native_heads=native,
    )


def _native_heads(src: Path, config: Dict[str, Any], model, mtp_hidden: Optional[str]):
    """The checkpoint's own MTP layers as a head set; a problem with them is
    reported and the backbone converts without heads."""
    from .native_mtp import extract

    try:
        heads = extract(src, config, model, mtp_hidden)
    except MTPDError as e:
        print(f"[mlx_mtpd convert] note: {e}", file=sys.stderr)
        return None
    if heads is not None:
        print(f"[mlx_mtpd convert] imported {heads.num_heads} native MTP layer(s) ({heads.config['family']}, "
              f"hidden state {heads.config['hidden_state']})", file=sys.stderr)
    return heads


def _write_heads(heads, folder: Path, quantize: bool, head_bits: int, group_size: int, dtype=None) -> None:
    """Write a head set into `folder`, quantized no lower than `head_bits` when the backbone is."""
    import tempfile

    from mlx_mtpd.heads import quantize_head_file, write_head_files

    if not quantize or head_bits >= 16:
        write_head_files(heads, folder, dtype)
        return
    with tempfile.TemporaryDirectory(dir=folder) as t:
        write_head_files(heads, Path(t), dtype)
        quantize_head_file(Path(t), folder, bits=head_bits, group_size=group_size)


def _mtp_only(hf_path: str, mlx_path, revision, head_bits: int, mtp_hidden: Optional[str]) -> Path:
    """Import the native MTP layers of `hf_path` into the converted backbone at `mlx_path`."""
    import mlx_lm

    from mlx_mtpd.heads import Backbone, check_fingerprint

    out = Path(mlx_path) if mlx_path else None
    if out is None or not (out / "config.json").exists():
        raise MTPDError(f"--mtp-only needs a converted backbone at --mlx-path ({mlx_path} has no config.json)")
    src = _fetch(hf_path, revision)
    config = _check_checkpoint(src)
    model, _ = mlx_lm.load(str(out), lazy=True)
    from .native_mtp import extract

    heads = extract(src, config, model, mtp_hidden)
    if heads is None:
        raise MTPDError(f"{src} declares no MTP layers: nothing to import")
    check_fingerprint(heads.config, Backbone(model), src)
    backbone_cfg = json.loads((out / "config.json").read_text())
    q = backbone_cfg.get("quantization")
    _write_heads(heads, out, q is not None, head_bits, (q or {}).get("group_size", 64))
    return out


def convert_gguf(
    gguf_path: str,
    mlx_path: str,
    *,
    dtype: Optional[str] = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    head_bits: int = DEFAULT_HEAD_BITS,
    force: bool = False,
) -> Path:
    from . import gguf as g
    from .tokenizer import build_tokenizer

    _check_out(mlx_path, force)
    weights, meta = g.read_gguf(Path(gguf_path))
    config = g.gguf_config(meta, weights)
    model_class, args_class = _model_class(config)
    model = model_class(args_class.from_dict(config))
    tensors = []
    for name, w in tqdm(
        g.hf_tensors(weights, meta, config),
        total=sum(not n.endswith((".scales", ".biases")) for n in weights),
        desc="dequantizing",
        unit="tensor",
        disable=None,
    ):
        mx.eval(w)
        tensors.append((name, w))
    del weights
    if hasattr(model, "sanitize"):  # the architecture's own fix-ups (Gemma 3: a tied output drops lm_head)
        tensors = list(model.sanitize(dict(tensors)).items())
    try:
        model.load_weights(tensors, strict=True)
    except ValueError as e:
        raise MTPDError(f"GGUF tensors do not fit a {config['model_type']} model: {e}") from None
    mx.eval(model.parameters())
    dtype = dtype or default_dtype()
    meta["context_length"] = config["max_position_embeddings"]
    return _finish(
        model, config, lambda tmp: build_tokenizer(meta, tmp), Path(mlx_path),
        dtype=dtype, quantize=quantize, q_bits=q_bits, q_group_size=q_group_size,
        dequantize=False, head_bits=head_bits, heads_from=None, force=force,
    )


def _check_out(mlx_path, force: bool) -> None:
    if mlx_path is None:
        raise MTPDError("no output folder: pass --mlx-path")
    if Path(mlx_path).exists() and not force:
        raise MTPDError(f"{mlx_path} already exists: choose another --mlx-path or pass --force")


def configure_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlx_mtpd convert",
        description="Convert a Hugging Face checkpoint or a GGUF file to an MLX model folder.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-path", "--model", help="Checkpoint folder or Hugging Face hub id.")
    src.add_argument("--gguf", help="A .gguf file (llama, mistral, qwen2, qwen3, gemma3 architectures).")
    p.add_argument("--mlx-path", default="mlx_model", help="Output folder (default: mlx_model).")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit).")
    p.add_argument("-q", "--quantize", action="store_true", help="Quantize the weights.")
    p.add_argument("--q-bits", type=int, choices=(4, 8), default=4, help="Bits per weight (default 4).")
    p.add_argument("--q-group-size", type=int, choices=(32, 64, 128), default=64,
                   help="Quantization group size (default 64).")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="Type of the float weights (default: the checkpoint's; "
                        "GGUF: float32 on a CPU, bfloat16 on a GPU).")
    p.add_argument("-d", "--dequantize", action="store_true", help="Dequantize a quantized model.")
    p.add_argument("--head-bits", type=int, choices=(4, 8, 16), default=DEFAULT_HEAD_BITS,
                   help="Bits for MTP head weights when quantizing (default 8; 16 keeps them float).")
    p.add_argument("--no-mtp", dest="mtp", action="store_false",
                   help="Do not import the checkpoint's native MTP layers.")
    p.add_argument("--mtp-only", action="store_true",
                   help="Write only the native MTP head set into the converted backbone at --mlx-path.")
    p.add_argument("--mtp-hidden", choices=("pre", "post"), default=None,
                   help="Feed native MTP layers the backbone's pre- or post-final-norm hidden state "
                        "(default: the family's convention).")
    p.add_argument("--force", action="store_true", help="Replace an existing output folder.")
    return p


def main(argv=None) -> None:
    from mlx_mtpd.errors import run_main

    args = configure_parser().parse_args(argv)

    def run():
        common = dict(dtype=args.dtype, quantize=args.quantize, q_bits=args.q_bits,
                      q_group_size=args.q_group_size, head_bits=args.head_bits, force=args.force)
        if args.gguf:
            if args.dequantize:
                raise MTPDError("--dequantize applies to MLX checkpoints; GGUF is always dequantized")
            out = convert_gguf(args.gguf, args.mlx_path, **common)
        else:
            out = convert_hf(args.hf_path, args.mlx_path, revision=args.revision,
                             dequantize=args.dequantize, mtp=args.mtp, mtp_only=args.mtp_only,
                             mtp_hidden=args.mtp_hidden, **common)
        print(f"[mlx_mtpd] wrote {out}")

    run_main("convert", run)
