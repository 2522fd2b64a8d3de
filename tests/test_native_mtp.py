"""Native MTP layers imported by the converter as head sets.

No real checkpoint can be downloaded here: each family gets a tiny checkpoint
with its real tensor names and shape relations and random weights, and the
imported head's logits are checked against a reference forward written
independently in numpy from the layout table (../shared/docs/NATIVE_MTP.md)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from conftest import TINY_CONFIGS, greedy_tokens, run_cli, write_hf_checkpoint
from mlx_mtpd.errors import MTPDError

H, I_, NH, NKV = 64, 128, 4, 2
HD = H // NH


def _rand(rng, *shape, scale=None):
    scale = scale if scale is not None else 2.0 / np.sqrt(shape[-1])
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def mimo_mtp_tensors(seed=0, prefix="model.mtp_layers.0."):
    rng = np.random.default_rng(seed)
    norm = lambda: (1.0 + 0.1 * rng.standard_normal(H)).astype(np.float32)  # noqa: E731
    t = {
        "token_layernorm.weight": norm(), "hidden_layernorm.weight": norm(),
        "input_proj.weight": _rand(rng, H, 2 * H), "final_layernorm.weight": norm(),
        "input_layernorm.weight": norm(), "post_attention_layernorm.weight": norm(),
        "self_attn.q_proj.weight": _rand(rng, NH * HD, H), "self_attn.q_proj.bias": _rand(rng, NH * HD, scale=0.1),
        "self_attn.k_proj.weight": _rand(rng, NKV * HD, H), "self_attn.k_proj.bias": _rand(rng, NKV * HD, scale=0.1),
        "self_attn.v_proj.weight": _rand(rng, NKV * HD, H), "self_attn.v_proj.bias": _rand(rng, NKV * HD, scale=0.1),
        "self_attn.o_proj.weight": _rand(rng, H, NH * HD),
        "mlp.gate_proj.weight": _rand(rng, I_, H), "mlp.up_proj.weight": _rand(rng, I_, H),
        "mlp.down_proj.weight": _rand(rng, H, I_),
    }
    return {prefix + k: v for k, v in t.items()}


# --- the numpy reference, from the layout table --------------------------------


def np_rms(x, w, eps=1e-6):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def np_rope(x, theta=10000.0):
    """Non-interleaved RoPE on (heads, L, d): rotate the two halves."""
    d = x.shape[-1]
    pos = np.arange(x.shape[1])[:, None]
    inv = theta ** (-np.arange(0, d, 2) / d)
    ang = pos * inv[None]
    cos, sin = np.cos(ang), np.sin(ang)
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


def np_qwen2_layer(x, w, p):
    """One qwen2-style decoder layer (MiMo's MTP block) over positions x: (L, H)."""
    L = x.shape[0]
    h = np_rms(x, w[p + "input_layernorm.weight"])
    q = h @ w[p + "self_attn.q_proj.weight"].T + w[p + "self_attn.q_proj.bias"]
    k = h @ w[p + "self_attn.k_proj.weight"].T + w[p + "self_attn.k_proj.bias"]
    v = h @ w[p + "self_attn.v_proj.weight"].T + w[p + "self_attn.v_proj.bias"]
    q = np_rope(q.reshape(L, NH, HD).transpose(1, 0, 2))
    k = np_rope(k.reshape(L, NKV, HD).transpose(1, 0, 2))
    v = v.reshape(L, NKV, HD).transpose(1, 0, 2)
    rep = NH // NKV
    k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
    s = q @ k.transpose(0, 2, 1) / np.sqrt(HD)
    s = s + np.triu(np.full((L, L), -np.inf), 1)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = (a @ v).transpose(1, 0, 2).reshape(L, NH * HD) @ w[p + "self_attn.o_proj.weight"].T
    x = x + o
    h = np_rms(x, w[p + "post_attention_layernorm.weight"])
    g = h @ w[p + "mlp.gate_proj.weight"].T
    u = h @ w[p + "mlp.up_proj.weight"].T
    return x + ((g / (1 + np.exp(-g))) * u) @ w[p + "mlp.down_proj.weight"].T


def np_mimo_mtp_logits(w, hidden, emb, lm_head, p="model.mtp_layers.0."):
    """MiMo: input_proj([hidden_layernorm(h) ; token_layernorm(e)]) -> block ->
    final_layernorm -> the main lm_head.  h is the backbone's pre-norm state."""
    x = np.concatenate([np_rms(hidden, w[p + "hidden_layernorm.weight"]),
                        np_rms(emb, w[p + "token_layernorm.weight"])], axis=-1) @ w[p + "input_proj.weight"].T
    y = np_qwen2_layer(x, w, p)
    return np_rms(y, w[p + "final_layernorm.weight"]) @ lm_head.T


# --- tests -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def mimo_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("mimo")
    extra = {k: mx.array(v) for k, v in mimo_mtp_tensors().items()}
    write_hf_checkpoint(root / "hf", "mimo", extra=extra)
    r = run_cli("convert", "--hf-path", root / "hf", "--mlx-path", root / "mlx")
    assert r.returncode == 0, r.stderr
    assert "imported 1 native MTP layer(s) (mimo" in r.stderr
    return root


def test_mimo_imported_head_matches_the_numpy_reference(mimo_ckpt):
    import mlx_lm

    from mlx_mtpd.heads import Backbone, load_heads

    cfg = json.loads((mimo_ckpt / "mlx" / "mtp_config.json").read_text())
    assert cfg["family"] == "mimo" and cfg["concat_order"] == "hidden_embedding"
    assert cfg["hidden_state"] == "pre_norm" and cfg["source"] == "native"
    model, _ = mlx_lm.load(str(mimo_ckpt / "mlx"))
    heads = load_heads(mimo_ckpt / "mlx", model)
    bb = Backbone(model)
    toks = [5, 17, 42, 99, 7, 250, 31, 64, 12, 8]
    _, hidden = bb.forward(mx.array(toks), None)
    # depth 1 at positions j = 0..L-2 takes (h_j, t_{j+1}) and predicts t_{j+2}
    h, nxt = hidden[:-1], mx.array(toks[1:])
    head = heads.heads[0]
    got = bb.project(head.norm(head(h, bb.embed_tokens(nxt))))
    w = mimo_mtp_tensors()
    lm_head = np.array(model.lm_head.weight)
    emb = np.array(model.model.embed_tokens.weight)[np.array(toks[1:])]
    want = np_mimo_mtp_logits(w, np.array(h), emb, lm_head)
    np.testing.assert_allclose(np.array(got), want, rtol=2e-4, atol=2e-4)


def test_mimo_greedy_speculative_equals_plain(mimo_ckpt):
    import mlx_lm

    from mlx_mtpd.engine import SpecStats, mtp_generate_step
    from mlx_mtpd.heads import load_heads

    model, _ = mlx_lm.load(str(mimo_ckpt / "mlx"))
    heads = load_heads(mimo_ckpt / "mlx", model)
    rng = np.random.default_rng(0)
    for _ in range(4):
        prompt = rng.integers(3, 300, size=8).tolist()
        ref = greedy_tokens(model, prompt, 24)
        for d in (1, 2, 4):  # D > 1 loops the one native layer
            stats = SpecStats()
            got = [t for t, _, _ in mtp_generate_step(mx.array(prompt), model, heads, num_draft=d,
                                                      max_tokens=24, stats=stats)]
            assert got == ref
            assert stats.rounds > 0


def test_generate_picks_up_native_heads_with_no_flag(mimo_ckpt):
    r = run_cli("generate", "--model", mimo_ckpt / "mlx", "--prompt", "the", "--max-tokens", 12,
                "--num-draft", 2, "--ignore-chat-template")
    assert r.returncode == 0, r.stderr
    assert "Acceptance: tau" in r.stdout


def test_no_mtp_mtp_only_and_quantized_heads(mimo_ckpt, tmp_path):
    r = run_cli("convert", "--hf-path", mimo_ckpt / "hf", "--mlx-path", tmp_path / "plain", "--no-mtp")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "plain" / "mtp_config.json").exists()
    # the head set alone, into the backbone converted without it
    r = run_cli("convert", "--hf-path", mimo_ckpt / "hf", "--mlx-path", tmp_path / "plain", "--mtp-only")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "plain" / "mtp_heads.safetensors").exists()
    # another model's backbone is refused
    write_hf_checkpoint(tmp_path / "other_hf", "mimo", seed=7)
    r = run_cli("convert", "--hf-path", tmp_path / "other_hf", "--mlx-path", tmp_path / "other", "--no-mtp")
    assert r.returncode == 0, r.stderr
    r = run_cli("convert", "--hf-path", mimo_ckpt / "hf", "--mlx-path", tmp_path / "other", "--mtp-only")
    assert r.returncode == 1 and "another backbone" in r.stderr
    # a 4-bit backbone keeps 8-bit heads
    r = run_cli("convert", "--hf-path", mimo_ckpt / "hf", "--mlx-path", tmp_path / "q4", "-q", "--q-bits", 4,
                "--q-group-size", 32)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "q4" / "mtp_config.json").read_text())
    assert cfg["quantization"]["bits"] == 8
    r = run_cli("generate", "--model", tmp_path / "q4", "--prompt", "the", "--max-tokens", 8, "--num-draft", 2,
                "--ignore-chat-template")
    assert r.returncode == 0, r.stderr


def test_declared_but_missing_or_misshapen_mtp_layers(tmp_path):
    # declared, not shipped: the backbone converts, with a note
    write_hf_checkpoint(tmp_path / "missing", "mimo")
    r = run_cli("convert", "--hf-path", tmp_path / "missing", "--mlx-path", tmp_path / "m1")
    assert r.returncode == 0, r.stderr
    assert "no model.mtp_layers.0.* tensors" in r.stderr
    assert (tmp_path / "m1" / "config.json").exists() and not (tmp_path / "m1" / "mtp_config.json").exists()
    # a piece missing
    t = mimo_mtp_tensors()
    t.pop("model.mtp_layers.0.input_proj.weight")
    write_hf_checkpoint(tmp_path / "partial", "mimo", extra={k: mx.array(v) for k, v in t.items()})
    r = run_cli("convert", "--hf-path", tmp_path / "partial", "--mlx-path", tmp_path / "m2")
    assert r.returncode == 0 and "input_proj.weight is missing" in r.stderr
    # a wrong shape
    t = mimo_mtp_tensors()
    t["model.mtp_layers.0.input_proj.weight"] = t["model.mtp_layers.0.input_proj.weight"][:, :H]
    write_hf_checkpoint(tmp_path / "shape", "mimo", extra={k: mx.array(v) for k, v in t.items()})
    r = run_cli("convert", "--hf-path", tmp_path / "shape", "--mlx-path", tmp_path / "m3")
    assert r.returncode == 0 and "do not fit" in r.stderr
    assert not (tmp_path / "m3" / "mtp_config.json").exists()


def test_unknown_family_is_reported():
    from mlx_mtpd.convert.native_mtp import extract

    with pytest.raises(MTPDError, match="not a known MTP family"):
        extract(None, {"model_type": "llama", "num_nextn_predict_layers": 1}, None)
    assert extract(None, dict(TINY_CONFIGS["llama"]), None) is None
