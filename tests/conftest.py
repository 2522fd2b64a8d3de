"""Shared fixtures: the real default model (imported once per session by the
project's own converter), tiny random checkpoints of several architectures,
and a runner for the CLIs as real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# One model cache for the whole session, shared with CLI subprocesses.  A
# developer can point MLX_MTPD_TEST_HOME at a folder to keep it between runs.
_HOME = os.environ.get("MLX_MTPD_TEST_HOME") or tempfile.mkdtemp(prefix="mlx_mtpd_test_home_")
os.environ["MLX_MTPD_HOME"] = _HOME

import mlx_mtpd  # noqa: E402,F401  (binds OpenBLAS before mlx.core loads)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

TINY_CONFIGS = {
    "llama": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "max_position_embeddings": 512,
    },
    "qwen2": {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": True, "max_position_embeddings": 512,
    },
    "qwen3": {
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "tie_word_embeddings": True, "max_position_embeddings": 512,
    },
    "gemma3_text": {
        "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-6,
        "sliding_window": 16, "sliding_window_pattern": 2, "query_pre_attn_scalar": 16,
        "max_position_embeddings": 512,
    },
    # head_dim 64: room for KV cache quantization groups (--kv-bits)
    "llama_hd64": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 128,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "max_position_embeddings": 512,
    },
    # Mistral's sliding-window variant (mlx-lm's llama with layer types), window 16
    "mistral_swa": {
        "model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "max_position_embeddings": 512, "sliding_window": 16,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "gpt_oss": {
        "model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], "hidden_size": 64,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000, "sliding_window": 16,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "mimo": {
        "model_type": "mimo", "architectures": ["MiMoForCausalLM"], "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 512, "tie_word_embeddings": False, "num_nextn_predict_layers": 1,
    },
    "phi3": {
        "model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 512, "tie_word_embeddings": False,
    },
}


def tiny_model(arch: str, vocab_size: int = 300, seed: int = 0):
    """A random mlx-lm model of `arch`, with weights large enough to give
    confident, varied predictions."""
    from mlx_lm.utils import _get_classes
    from mlx.utils import tree_flatten, tree_unflatten

    config = dict(TINY_CONFIGS[arch], vocab_size=vocab_size)
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    params = tree_flatten(model.parameters())
    rng = np.random.default_rng(seed)
    new = []
    for k, v in params:
        if "norm" in k:
            new.append((k, mx.array(1.0 + 0.1 * rng.standard_normal(v.shape), dtype=mx.float32)
                        if arch != "gemma3_text" else mx.array(0.1 * rng.standard_normal(v.shape), dtype=mx.float32)))
        else:
            new.append((k, mx.array(rng.standard_normal(v.shape) * (1.0 / np.sqrt(v.shape[-1])) * 2.0,
                                    dtype=mx.float32)))
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())
    return model, config


def byte_tokenizer(vocab_size: int = 300):
    """A small byte-level BPE tokenizer in Hugging Face format, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("a", "n")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>",
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


def write_hf_checkpoint(path: Path, arch: str, vocab_size: int = 300, seed: int = 0,
                        dtype: str = "float32", extra=None):
    """A save_pretrained-style folder: config.json + model.safetensors + tokenizer
    files; `extra` adds tensors (native MTP layers) under their checkpoint names."""
    from mlx.utils import tree_flatten

    model, config = tiny_model(arch, vocab_size, seed)
    path.mkdir(parents=True, exist_ok=True)
    weights = {k: v.astype(getattr(mx, dtype)) for k, v in tree_flatten(model.parameters())}
    weights.update(extra or {})
    if arch == "gemma3_text" or config.get("tie_word_embeddings"):
        weights.pop("lm_head.weight", None)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(dict(config, torch_dtype=dtype, bos_token_id=1,
                                                      eos_token_id=2)))
    byte_tokenizer(vocab_size).save_pretrained(str(path))
    return model


def greedy_tokens(model, prompt, n):
    """Plain greedy decoding with mlx-lm's own generate_step."""
    from mlx_lm.generate import generate_step

    out = []
    for tok, _ in generate_step(mx.array(prompt), model, max_tokens=n):
        out.append(int(tok))
    return out


def run_cli(*args, env=None, timeout=600, input=None):
    """Run `python -m mlx_mtpd ARGS` as a real subprocess."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "mlx_mtpd", *map(str, args)],
        capture_output=True, text=True, env=e, timeout=timeout, input=input,
    )


def leftovers(folder: Path):
    """Temporary or partial outputs left in `folder` (there must be none)."""
    return [p.name for p in Path(folder).iterdir() if ".tmp" in p.name or p.name.startswith(".")]


@pytest.fixture(scope="session")
def smol_path():
    """The default model, imported from its GGUF by the project's converter (once)."""
    from mlx_mtpd.utils import default_model_path

    return default_model_path("float32")


@pytest.fixture(scope="session")
def smol(smol_path):
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(smol_path))
    return model, tokenizer
