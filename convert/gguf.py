"""Read a GGUF file into Hugging Face-named float tensors and a config.json dict.

Q4_0, Q4_1, Q8_0, F16 and F32 come through `mlx.core.load` (quantized types as
MLX affine triples, dequantized here).  Other types, K-quants included, go
through the `gguf` package's numpy dequantizers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

import mlx.core as mx
import numpy as np

from mlx_mtpd.errors import MTPDError

MX_TYPES = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0"}

# GGUF tensor names (after blk.N.) -> Hugging Face names (after model.layers.N.)
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# Architectures this importer knows: (mlx-lm model_type, HF class, q/k rows permuted?)
ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM", True),
    "mistral": ("llama", "LlamaForCausalLM", True),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", False),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM", False),
}
# Per-architecture layer names beside (or instead of) LAYER_NAMES.
QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
ARCH_LAYER_NAMES = {
    "qwen3": QK_NORMS,
    # Gemma 3: a norm before and after attention and before and after the MLP
    "gemma3": dict(QK_NORMS, post_attention_norm="post_attention_layernorm",
                   ffn_norm="pre_feedforward_layernorm", post_ffw_norm="post_feedforward_layernorm"),
}
# llama.cpp stores Gemma's RMSNorm weights as 1 + w (ggml's norm multiplies by
# the weight; Gemma's by 1 + w): mlx-lm's Gemma norms take w.
NORM_SHIFT = {"gemma3": 1.0}
# Gemma 3's facts llama.cpp does not store (it hard-codes them too): five local
# layers to one global, and the local layers' RoPE base.
GEMMA3_SLIDING_PATTERN = 6
GEMMA3_LOCAL_ROPE_BASE = 10_000.0


def _value(v: Any) -> Any:
    if isinstance(v, mx.array):
        return v.item() if v.ndim == 0 else v.tolist()
    return v


def _check_magic(path: Path) -> None:
    if not path.exists():
        raise MTPDError(f"GGUF file {path} not found: check the --gguf path")
    if path.is_dir():
        raise MTPDError(f"{path} is a folder, not a GGUF file: use --hf-path for folders")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise MTPDError(f"{path} is not a GGUF file (bad magic): pass a .gguf file")


def _tensor_types(path: Path) -> Dict[str, str]:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf reader raises many kinds on bad files
        raise MTPDError(
            f"{path} is truncated or corrupt ({type(e).__name__}: {e}): download it again"
        ) from None
    return {t.name: t.tensor_type.name for t in reader.tensors}


def _read_with_gguf_package(path: Path) -> Tuple[Dict[str, mx.array], Dict[str, Any]]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            meta[name] = field.contents()
        except Exception:
            continue
    weights = {}
    for t in reader.tensors:
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise MTPDError(
                f"GGUF tensor {t.name} has type {t.tensor_type.name}, not supported "
                "yet: use a Q8_0, Q4_0, Q4_1, K-quant, F16 or F32 file"
            ) from None
        weights[t.name] = mx.array(np.asarray(arr, dtype=np.float32))
    return weights, meta


def read_gguf(path: Path) -> Tuple[Dict[str, mx.array], Dict[str, Any]]:
    """Return ({gguf tensor name: array}, metadata) with quantized tensors still packed."""
    path = Path(path)
    _check_magic(path)
    types = _tensor_types(path)
    if set(types.values()) <= MX_TYPES:
        try:
            weights, meta = mx.load(str(path), return_metadata=True)
        except RuntimeError as e:
            raise MTPDError(f"{path} is truncated or corrupt ({e}): download it again") from None
        return weights, {k: _value(v) for k, v in meta.items()}
    return _read_with_gguf_package(path)


def _unpermute(w: mx.array, n_head: int) -> mx.array:
    """Undo llama.cpp's interleaving of the rotary halves of q/k rows."""
    rows = w.shape[0]
    return (
        w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _dequantize(weights: Dict[str, mx.array], name: str) -> mx.array:
    """A GGUF tensor as float32, unpacking mx.load's affine (weight, scales, biases)."""
    w = weights[name]
    stem = name[: -len(".weight")] if name.endswith(".weight") else name
    scales = weights.get(f"{stem}.scales")
    if scales is None:
        return w.astype(mx.float32)
    biases = weights[f"{stem}.biases"]
    group_size = 32  # every GGUF block type mx.load unpacks has 32 weights a block
    in_dims = scales.shape[-1] * group_size
    bits = w.shape[-1] * 32 // in_dims
    return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits).astype(
        mx.float32
    )


def gguf_config(meta: Dict[str, Any], names) -> Dict[str, Any]:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise MTPDError(
            f"GGUF architecture {arch!r} is not supported yet "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    model_type, hf_class, _ = ARCHITECTURES[arch]

    def get(key, default=None):
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise MTPDError(f"GGUF metadata lacks {arch}.{key}: the file is incomplete")
        return v

    n_head = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    config = {
        "model_type": model_type,
        "architectures": [hf_class],
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(get("attention.head_count_kv", n_head)),
        "head_dim": int(meta.get(f"{arch}.attention.key_length", hidden // n_head)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
    }
    for key in ("bos", "eos"):
        if (i := meta.get(f"tokenizer.ggml.{key}_token_id")) is not None:
            config[f"{key}_token_id"] = int(i)
    if arch == "gemma3":
        config.pop("hidden_act")
        head_dim = config["head_dim"]
        config.update(
            sliding_window=int(get("attention.sliding_window")),
            sliding_window_pattern=GEMMA3_SLIDING_PATTERN,
            rope_local_base_freq=GEMMA3_LOCAL_ROPE_BASE,
            # 1/sqrt(256) for every size but the 27B (head_dim 128, scaled by hidden / heads)
            query_pre_attn_scalar=head_dim if head_dim != 128 else hidden // n_head,
            hidden_activation="gelu_pytorch_tanh",
        )
        if meta.get("gemma3.rope.scaling.type") == "linear":
            config["rope_scaling"] = {"rope_type": "linear", "factor": float(meta["gemma3.rope.scaling.factor"])}
        # a chat ends at <end_of_turn> as well as at <eos>
        tokens = meta.get("tokenizer.ggml.tokens") or []
        if "<end_of_turn>" in tokens and "eos_token_id" in config:
            config["eos_token_id"] = [config["eos_token_id"], tokens.index("<end_of_turn>")]
    return config


def hf_tensors(
    weights: Dict[str, mx.array], meta: Dict[str, Any], config: Dict[str, Any]
) -> Iterator[Tuple[str, mx.array]]:
    """Yield (Hugging Face name, float32 array) for every GGUF tensor."""
    arch = meta["general.architecture"]
    _, _, permuted = ARCHITECTURES[arch]
    layer_names = dict(LAYER_NAMES, **ARCH_LAYER_NAMES.get(arch, {}))
    shift = NORM_SHIFT.get(arch)
    for name in weights:
        if name.endswith((".scales", ".biases")):
            continue
        parts = name.split(".")
        if parts[0] == "blk":
            layer, kind, suffix = parts[1], parts[2], ".".join(parts[3:])
            if kind not in layer_names:
                raise MTPDError(f"unknown GGUF tensor {name}: this layout is not supported yet")
            hf = f"model.layers.{layer}.{layer_names[kind]}.{suffix}"
        elif parts[0] in GLOBAL_NAMES:
            kind = parts[0]
            hf = f"{GLOBAL_NAMES[kind]}.{'.'.join(parts[1:])}"
        else:
            continue  # rope_freqs and other derived tables mlx-lm recomputes
        w = _dequantize(weights, name)
        if permuted and kind == "attn_q" and suffix == "weight":
            w = _unpermute(w, config["num_attention_heads"])
        elif permuted and kind == "attn_k" and suffix == "weight":
            w = _unpermute(w, config["num_key_value_heads"])
        if shift and kind.endswith("norm"):
            w = w - shift
        yield hf, w
