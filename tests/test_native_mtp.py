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
TOKS = [5, 17, 42, 99, 7, 250, 31, 64, 12, 8, 77, 3]


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


def np_causal_attention(q, k, v):
    """Causal softmax attention; q: (heads, L, d), k and v: (kv heads, L, d) shared
    by groups of query heads.  Returns (L, heads * d_v)."""
    nh, L, d = q.shape
    k, v = np.repeat(k, nh // k.shape[0], 0), np.repeat(v, nh // v.shape[0], 0)
    s = q @ k.transpose(0, 2, 1) / np.sqrt(d) + np.triu(np.full((L, L), -np.inf), 1)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ v).transpose(1, 0, 2).reshape(L, -1)


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


def assert_drafting_is_lossless(model, heads, seed, drafts=(1, 3), prompts=3, tokens=20):
    """Greedy speculative output with the imported head equals plain greedy decoding
    (D > 1 loops the one native layer); returns the total drafting rounds."""
    from mlx_mtpd.engine import SpecStats, mtp_generate_step

    rng = np.random.default_rng(seed)
    rounds = 0
    for _ in range(prompts):
        prompt = rng.integers(3, 300, size=8).tolist()
        ref = greedy_tokens(model, prompt, tokens)
        for d in drafts:
            st = SpecStats()
            got = [t for t, _, _ in mtp_generate_step(mx.array(prompt), model, heads, num_draft=d,
                                                      max_tokens=tokens, stats=st)]
            assert got == ref, (d, got, ref)
            rounds += st.rounds
    return rounds


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
    toks = TOKS
    _, hidden = bb.forward(mx.array(toks), None)
    # depth 1 at positions j = 0..L-2 takes (h_j, t_{j+1}) and predicts t_{j+2}
    h, nxt = hidden[:-1], mx.array(toks[1:])
    head = heads.heads[0]
    got = bb.project(head.norm(head(h, bb.embed_tokens(nxt))))
    w = mimo_mtp_tensors()
    lm_head = np.array(model.lm_head.weight)
    emb = np.array(model.model.embed_tokens.weight)[np.array(TOKS[1:])]
    want = np_mimo_mtp_logits(w, np.array(h), emb, lm_head)
    np.testing.assert_allclose(np.array(got), want, rtol=2e-4, atol=2e-4)


def test_mimo_greedy_speculative_equals_plain(mimo_ckpt):
    import mlx_lm

    from mlx_mtpd.heads import load_heads

    model, _ = mlx_lm.load(str(mimo_ckpt / "mlx"))
    heads = load_heads(mimo_ckpt / "mlx", model)
    assert assert_drafting_is_lossless(model, heads, seed=0, drafts=(1, 2, 4), prompts=4, tokens=24) > 0


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


# --- DeepSeek-V3: MLA + MoE block, fp8 blocks with weight_scale_inv -------------

DS = dict(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], vocab_size=300, hidden_size=64,
          intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=2.5,
          kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16,
          topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, n_group=2, topk_group=1,
          num_experts_per_tok=2, moe_layer_freq=1, first_k_dense_replace=1, max_position_embeddings=512,
          rms_norm_eps=1e-6, rope_theta=10000.0, attention_bias=False, tie_word_embeddings=False,
          num_nextn_predict_layers=1, torch_dtype="float32", bos_token_id=1, eos_token_id=2,
          quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                               "activation_scheme": "dynamic"})


def _e4m3_table():
    b = np.arange(256)
    sign = np.where(b >> 7, -1.0, 1.0)
    e, m = (b >> 3) & 15, b & 7
    val = np.where(e == 0, m / 8 * 2.0 ** -6, (1 + m / 8) * 2.0 ** (e - 7.0))
    val = sign * val
    val[(e == 15) & (m == 7)] = np.nan
    return val


E4M3 = _e4m3_table()


def to_fp8(w):
    """Nearest e4m3 codes for w / s, with s a power of two; returns (codes, scale_inv, decoded)."""
    s = 2.0 ** np.ceil(np.log2(np.abs(w).max() / 240.0))
    finite = np.where(np.isnan(E4M3), np.inf, E4M3)
    codes = np.abs((w / s)[..., None] - finite).argmin(-1).astype(np.uint8)
    m, n = w.shape
    scale_inv = np.full((-(-m // 128), -(-n // 128)), s, np.float32)
    return codes, scale_inv, (E4M3[codes] * s).astype(np.float32)


def write_safetensors(path, tensors):
    """Our own writer, for the F8_E4M3 dtype that mx.save_safetensors cannot write."""
    import struct

    kinds = {np.dtype(np.float32): "F32", np.dtype(np.uint8): "F8_E4M3"}
    header, blobs, off = {}, [], 0
    for k, v in tensors.items():
        v = np.ascontiguousarray(v)
        header[k] = {"dtype": kinds[v.dtype], "shape": list(v.shape), "data_offsets": [off, off + v.nbytes]}
        blobs.append(v.tobytes())
        off += v.nbytes
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def save_checkpoint(path, tensors, config):
    """A Hugging Face folder: our safetensors file, config.json, a byte-level tokenizer."""
    from conftest import byte_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / "model.safetensors", tensors)
    (path / "config.json").write_text(json.dumps(config))
    byte_tokenizer(config.get("vocab_size", 300)).save_pretrained(str(path))


def moe_checkpoint(path, c=DS, seed=0, fp8=True, with_mtp=True):
    """A tiny DeepSeek-V3-layout checkpoint (DeepSeek: MLA; GLM-4.5: GQA with
    partial RoPE, q/k norms and biases) in the Hugging Face layout: layer 0
    dense, layer 1 MoE, MTP layer 2 (enorm/hnorm/eh_proj/shared_head + an MoE
    block; with fp8, attention and expert weights in e4m3 blocks).  Returns the
    float weights (fp8 ones decoded)."""

    rng = np.random.default_rng(seed)
    mla = c["model_type"].startswith("deepseek")
    Hd, V = c["hidden_size"], c["vocab_size"]
    nh = c["num_attention_heads"]
    E, mI = c["n_routed_experts"], c["moe_intermediate_size"]
    norm = lambda n: (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)  # noqa: E731
    w = {"model.embed_tokens.weight": _rand(rng, V, Hd, scale=1.0), "model.norm.weight": norm(Hd),
         "lm_head.weight": _rand(rng, V, Hd)}

    def layer(p, moe):
        w[p + "input_layernorm.weight"] = norm(Hd)
        w[p + "post_attention_layernorm.weight"] = norm(Hd)
        a = p + "self_attn."
        if mla:
            nope, rope, vd = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
            w[a + "q_a_proj.weight"] = _rand(rng, c["q_lora_rank"], Hd)
            w[a + "q_a_layernorm.weight"] = norm(c["q_lora_rank"])
            w[a + "q_b_proj.weight"] = _rand(rng, nh * (nope + rope), c["q_lora_rank"])
            w[a + "kv_a_proj_with_mqa.weight"] = _rand(rng, c["kv_lora_rank"] + rope, Hd)
            w[a + "kv_a_layernorm.weight"] = norm(c["kv_lora_rank"])
            w[a + "kv_b_proj.weight"] = _rand(rng, nh * (nope + vd), c["kv_lora_rank"])
            w[a + "o_proj.weight"] = _rand(rng, Hd, nh * vd)
        else:
            hd, nkv = c["head_dim"], c["num_key_value_heads"]
            for n_, rows in (("q_proj", nh * hd), ("k_proj", nkv * hd), ("v_proj", nkv * hd)):
                w[a + n_ + ".weight"] = _rand(rng, rows, Hd)
                w[a + n_ + ".bias"] = _rand(rng, rows, scale=0.1)
            w[a + "o_proj.weight"] = _rand(rng, Hd, nh * hd)
            w[a + "q_norm.weight"], w[a + "k_norm.weight"] = norm(hd), norm(hd)
        m = p + "mlp."
        if not moe:
            for n_, shape in (("gate_proj", (128, Hd)), ("up_proj", (128, Hd)), ("down_proj", (Hd, 128))):
                w[m + n_ + ".weight"] = _rand(rng, *shape)
            return
        w[m + "gate.weight"] = _rand(rng, E, Hd)
        w[m + "gate.e_score_correction_bias"] = (0.1 * rng.standard_normal(E)).astype(np.float32)
        for e in range(E):
            w[m + f"experts.{e}.gate_proj.weight"] = _rand(rng, mI, Hd)
            w[m + f"experts.{e}.up_proj.weight"] = _rand(rng, mI, Hd)
            w[m + f"experts.{e}.down_proj.weight"] = _rand(rng, Hd, mI)
        for n_, shape in (("gate_proj", (mI, Hd)), ("up_proj", (mI, Hd)), ("down_proj", (Hd, mI))):
            w[m + "shared_experts." + n_ + ".weight"] = _rand(rng, *shape)

    layer("model.layers.0.", moe=False)
    layer("model.layers.1.", moe=True)
    if with_mtp:
        p = "model.layers.2."
        layer(p, moe=True)
        w[p + "enorm.weight"], w[p + "hnorm.weight"] = norm(Hd), norm(Hd)
        w[p + "eh_proj.weight"] = _rand(rng, Hd, 2 * Hd)
        w[p + "shared_head.norm.weight"] = norm(Hd)
        w[p + "shared_head.head.weight"] = w["lm_head.weight"].copy()  # copies of the main ones
        w[p + "embed_tokens.weight"] = w["model.embed_tokens.weight"].copy()
    stored = dict(w)
    if fp8 and with_mtp:
        for k in list(w):
            if k.startswith("model.layers.2.") and k.endswith("proj.weight") and "eh_proj" not in k \
                    and "shared_experts" not in k:
                codes, scale_inv, decoded = to_fp8(w[k])
                stored[k] = codes
                stored[k.replace(".weight", ".weight_scale_inv")] = scale_inv
                w[k] = decoded
    save_checkpoint(path, stored, c)
    return w


def np_rope_interleaved(x, theta=10000.0):
    """RoPE on adjacent pairs (DeepSeek's layout), x: (heads, L, d)."""
    d = x.shape[-1]
    ang = np.arange(x.shape[1])[:, None] * theta ** (-np.arange(0, d, 2) / d)[None]
    cos, sin = np.cos(ang), np.sin(ang)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    return out


def np_mla(x, w, a, c=DS):
    L = x.shape[0]
    nh, nope, rope, vd = c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    q = np_rms(x @ w[a + "q_a_proj.weight"].T, w[a + "q_a_layernorm.weight"]) @ w[a + "q_b_proj.weight"].T
    q = q.reshape(L, nh, nope + rope).transpose(1, 0, 2)
    q_nope, q_pe = q[..., :nope], np_rope_interleaved(q[..., nope:])
    kv_a = x @ w[a + "kv_a_proj_with_mqa.weight"].T
    ckv, k_pe = kv_a[:, : c["kv_lora_rank"]], kv_a[:, c["kv_lora_rank"]:]
    kv = (np_rms(ckv, w[a + "kv_a_layernorm.weight"]) @ w[a + "kv_b_proj.weight"].T)
    kv = kv.reshape(L, nh, nope + vd).transpose(1, 0, 2)
    k_nope, v = kv[..., :nope], kv[..., nope:]
    k_pe = np_rope_interleaved(k_pe[None])  # one rope key shared by all heads
    s = (q_nope @ k_nope.transpose(0, 2, 1) + q_pe @ k_pe.transpose(0, 2, 1)) / np.sqrt(nope + rope)
    s = s + np.triu(np.full((L, L), -np.inf), 1)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ v).transpose(1, 0, 2).reshape(L, nh * vd) @ w[a + "o_proj.weight"].T


def np_swiglu_mlp(x, w, m):
    g = x @ w[m + "gate_proj.weight"].T
    return ((g / (1 + np.exp(-g))) * (x @ w[m + "up_proj.weight"].T)) @ w[m + "down_proj.weight"].T


def np_deepseek_moe(x, w, m, c=DS):
    """noaux_tc routing: sigmoid scores, bias only for the choice, the best
    topk_group groups by their top-2 sum, top-k experts, weights normalized and scaled."""
    E, G = c["n_routed_experts"], c["n_group"]
    scores = 1 / (1 + np.exp(-(x @ w[m + "gate.weight"].T)))  # (the shared expert is always named so)
    choice = scores + w[m + "gate.e_score_correction_bias"]
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        grp = choice[t].reshape(G, E // G)
        gscore = np.sort(grp, axis=-1)[:, -2:].sum(-1)
        keep = np.argsort(-gscore)[: c["topk_group"]]
        masked = np.zeros_like(grp)
        masked[keep] = grp[keep]
        top = np.argsort(-masked.reshape(-1))[: c["num_experts_per_tok"]]
        wts = scores[t, top] / scores[t, top].sum() * c["routed_scaling_factor"]
        for e, wt in zip(top, wts):
            out[t] += wt * np_swiglu_mlp(x[t : t + 1], w, m + f"experts.{e}.")[0]
    return out + np_swiglu_mlp(x, w, m + "shared_experts.")


def np_gqa_partial_rope(x, w, a, c):
    """GLM-4.5 attention: biased q/k/v, per-head q/k RMSNorm, RoPE on the first
    partial_rotary_factor of each head (halves layout), grouped KV heads."""
    L, nh, nkv, hd = x.shape[0], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    eps = c["rms_norm_eps"]
    q = (x @ w[a + "q_proj.weight"].T + w[a + "q_proj.bias"]).reshape(L, nh, hd)
    k = (x @ w[a + "k_proj.weight"].T + w[a + "k_proj.bias"]).reshape(L, nkv, hd)
    v = (x @ w[a + "v_proj.weight"].T + w[a + "v_proj.bias"]).reshape(L, nkv, hd).transpose(1, 0, 2)
    q = np_rms(q, w[a + "q_norm.weight"], eps).transpose(1, 0, 2)
    k = np_rms(k, w[a + "k_norm.weight"], eps).transpose(1, 0, 2)
    rot = int(hd * c["partial_rotary_factor"])
    q = np.concatenate([np_rope(q[..., :rot], c["rope_theta"]), q[..., rot:]], -1)
    k = np.concatenate([np_rope(k[..., :rot], c["rope_theta"]), k[..., rot:]], -1)
    k, v = np.repeat(k, nh // nkv, axis=0), np.repeat(v, nh // nkv, axis=0)
    s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + np.triu(np.full((L, L), -np.inf), 1)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ v).transpose(1, 0, 2).reshape(L, nh * hd) @ w[a + "o_proj.weight"].T


def np_deepseek_mtp_logits(w, hidden_pre, emb, p="model.layers.2.", c=DS):
    """DeepSeek-V3 / GLM-4.5 MTP: eh_proj([enorm(e) ; hnorm(h)]) with h the
    backbone's post-norm state -> the block (MLA or GQA, then MoE) ->
    shared_head.norm -> shared_head.head."""
    eps = c["rms_norm_eps"]
    h = np_rms(hidden_pre, w["model.norm.weight"], eps)
    x = np.concatenate([np_rms(emb, w[p + "enorm.weight"], eps), np_rms(h, w[p + "hnorm.weight"], eps)], -1)
    x = x @ w[p + "eh_proj.weight"].T
    hn = np_rms(x, w[p + "input_layernorm.weight"], eps)
    if c["model_type"].startswith("deepseek"):
        x = x + np_mla(hn, w, p + "self_attn.", c)
    else:
        x = x + np_gqa_partial_rope(hn, w, p + "self_attn.", c)
    x = x + np_deepseek_moe(np_rms(x, w[p + "post_attention_layernorm.weight"], eps), w, p + "mlp.", c)
    return np_rms(x, w[p + "shared_head.norm.weight"], eps) @ w[p + "shared_head.head.weight"].T


@pytest.fixture(scope="module")
def deepseek_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepseek")
    w = moe_checkpoint(root / "hf")
    r = run_cli("convert", "--hf-path", root / "hf", "--mlx-path", root / "mlx")
    assert r.returncode == 0, r.stderr
    assert "imported 1 native MTP layer(s) (deepseek_v3" in r.stderr
    return root, w


def _teacher_forced_logits(folder, toks):
    import mlx_lm

    from mlx_mtpd.heads import Backbone, load_heads

    model, _ = mlx_lm.load(str(folder))
    heads = load_heads(folder, model)
    bb = Backbone(model)
    _, hidden = bb.forward(mx.array(toks), None)
    entry = heads.entry_hidden(bb)
    h = hidden[:-1]
    head = heads.heads[0]
    out = head(entry(h) if entry else h, bb.embed_tokens(mx.array(toks[1:])))
    return np.array(bb.project(head.norm(out))), np.array(h), model, heads



def convert_and_read(src, out, family):
    """Convert with the CLI (native MTP imported), then the head's teacher-forced logits on TOKS."""
    r = run_cli("convert", "--hf-path", src, "--mlx-path", out)
    assert r.returncode == 0, r.stderr
    assert f"imported 1 native MTP layer(s) ({family}" in r.stderr
    return _teacher_forced_logits(out, TOKS)


def test_deepseek_fp8_mtp_matches_the_numpy_reference(deepseek_ckpt):
    root, w = deepseek_ckpt
    cfg = json.loads((root / "mlx" / "mtp_config.json").read_text())
    assert cfg["family"] == "deepseek_v3" and cfg["hidden_state"] == "post_norm"
    toks = [5, 17, 42, 99, 7, 250, 31, 64, 12, 8, 77, 3]
    got, h, _, _ = _teacher_forced_logits(root / "mlx", toks)
    emb = w["model.embed_tokens.weight"][np.array(TOKS[1:])]
    want = np_deepseek_mtp_logits(w, h, emb)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    # the backbone's own hidden state agrees with a float reading of the checkpoint too
    assert np.isfinite(got).all()


def test_deepseek_greedy_speculative_equals_plain_and_mtp_hidden_override(deepseek_ckpt, tmp_path):
    root, _ = deepseek_ckpt
    _, _, model, heads = _teacher_forced_logits(root / "mlx", [1, 2, 3])
    assert assert_drafting_is_lossless(model, heads, seed=1) > 0
    r = run_cli("convert", "--hf-path", root / "hf", "--mlx-path", tmp_path / "pre", "--mtp-hidden", "pre")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "pre" / "mtp_config.json").read_text())["hidden_state"] == "pre_norm"


GLM = dict(model_type="glm4_moe", architectures=["Glm4MoeForCausalLM"], vocab_size=300, hidden_size=64,
           intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, head_dim=16, n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=2.5,
           norm_topk_prob=True, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
           max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
           use_qk_norm=True, tie_word_embeddings=False, attention_bias=True, partial_rotary_factor=0.5,
           num_nextn_predict_layers=1, torch_dtype="float32", bos_token_id=1, eos_token_id=2)


def test_glm45_mtp_matches_the_numpy_reference_and_drafts_losslessly(tmp_path):

    w = moe_checkpoint(tmp_path / "hf", GLM, seed=3, fp8=False)
    got, h, model, heads = convert_and_read(tmp_path / "hf", tmp_path / "mlx", "glm4_moe")
    want = np_deepseek_mtp_logits(w, h, w["model.embed_tokens.weight"][np.array(TOKS[1:])], c=GLM)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    assert assert_drafting_is_lossless(model, heads, seed=9, drafts=(1, 2), prompts=1, tokens=16) > 0


# --- ERNIE 4.5 MoE: no final norm, a biased projection, softmax routing ---------------

ERNIE = dict(model_type="ernie4_5_moe", architectures=["Ernie4_5_MoeForCausalLM"], vocab_size=300, hidden_size=64,
             intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             num_hidden_layers=2, rms_norm_eps=1e-5, rope_theta=10000.0, use_bias=False,
             tie_word_embeddings=False, moe_num_experts=4, moe_layer_start_index=1, moe_intermediate_size=32,
             moe_k=2, moe_layer_interval=1, moe_num_shared_experts=1, moe_gate_act="softmax",
             max_position_embeddings=512, num_nextn_predict_layers=1, torch_dtype="float32",
             bos_token_id=1, eos_token_id=2)


def gqa_moe_block(w, rng, p, moe, qk_norm=False, Hd=64, nh=4, nkv=2, hd=16, experts=4):
    """A decoder block's tensors under prefix p: GQA attention (q/k norms optional),
    then a dense MLP or softmax/sigmoid-routed experts plus one shared expert."""
    norm = lambda n: (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)  # noqa: E731
    w[p + "input_layernorm.weight"], w[p + "post_attention_layernorm.weight"] = norm(Hd), norm(Hd)
    for n_, rows in (("q_proj", nh * hd), ("k_proj", nkv * hd), ("v_proj", nkv * hd)):
        w[p + "self_attn." + n_ + ".weight"] = _rand(rng, rows, Hd)
    w[p + "self_attn.o_proj.weight"] = _rand(rng, Hd, nh * hd)
    if qk_norm:
        w[p + "self_attn.q_norm.weight"], w[p + "self_attn.k_norm.weight"] = norm(hd), norm(hd)
    mlps = [("mlp.", 128)] if not moe else [(f"mlp.experts.{e}.", 32) for e in range(experts)]
    mlps += [("mlp.shared_experts.", 32)] if moe else []
    for m, inter in mlps:
        w[p + m + "gate_proj.weight"], w[p + m + "up_proj.weight"] = _rand(rng, inter, Hd), _rand(rng, inter, Hd)
        w[p + m + "down_proj.weight"] = _rand(rng, Hd, inter)
    if moe:
        w[p + "mlp.gate.weight"] = _rand(rng, experts, Hd)


def ernie_checkpoint(path, seed=0):

    rng = np.random.default_rng(seed)
    c = ERNIE
    Hd, V = c["hidden_size"], c["vocab_size"]
    norm = lambda n: (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)  # noqa: E731
    w = {"model.embed_tokens.weight": _rand(rng, V, Hd, scale=1.0), "model.norm.weight": norm(Hd),
         "lm_head.weight": _rand(rng, V, Hd)}

    def block(p, moe):
        gqa_moe_block(w, rng, p, moe)

    block("model.layers.0.", moe=False)
    block("model.layers.1.", moe=True)
    block("model.mtp_block.0.", moe=True)
    w["model.mtp_emb_norm.0.weight"], w["model.mtp_hidden_norm.0.weight"] = norm(Hd), norm(Hd)
    w["model.mtp_linear_proj.0.weight"] = _rand(rng, Hd, 2 * Hd)
    w["model.mtp_linear_proj.0.bias"] = _rand(rng, Hd, scale=0.1)
    save_checkpoint(path, w, c)
    return w


def np_ernie_mtp_logits(w, hidden_pre, emb, c=ERNIE):
    """ERNIE 4.5: mtp_linear_proj([emb_norm(e) ; hidden_norm(h)]) + bias, h post-norm
    -> block (interleaved RoPE attention, softmax top-k MoE + shared expert) ->
    the main lm_head with *no* final norm."""
    eps, p = c["rms_norm_eps"], "model.mtp_block.0."
    h = np_rms(hidden_pre, w["model.norm.weight"], eps)
    x = np.concatenate([np_rms(emb, w["model.mtp_emb_norm.0.weight"], eps),
                        np_rms(h, w["model.mtp_hidden_norm.0.weight"], eps)], -1)
    x = x @ w["model.mtp_linear_proj.0.weight"].T + w["model.mtp_linear_proj.0.bias"]
    L, nh, nkv, hd = x.shape[0], 4, 2, 16
    a = np_rms(x, w[p + "input_layernorm.weight"], eps)
    q = np_rope_interleaved((a @ w[p + "self_attn.q_proj.weight"].T).reshape(L, nh, hd).transpose(1, 0, 2))
    k = np_rope_interleaved((a @ w[p + "self_attn.k_proj.weight"].T).reshape(L, nkv, hd).transpose(1, 0, 2))
    v = (a @ w[p + "self_attn.v_proj.weight"].T).reshape(L, nkv, hd).transpose(1, 0, 2)
    x = x + np_causal_attention(q, k, v) @ w[p + "self_attn.o_proj.weight"].T
    m = np_rms(x, w[p + "post_attention_layernorm.weight"], eps)
    g = m @ w[p + "mlp.gate.weight"].T
    g = np.exp(g - g.max(-1, keepdims=True))
    g /= g.sum(-1, keepdims=True)
    out = np.zeros_like(m)
    for t in range(L):
        top = np.argsort(-g[t])[: c["moe_k"]]
        for e, wt in zip(top, g[t, top] / g[t, top].sum()):
            out[t] += wt * np_swiglu_mlp(m[t : t + 1], w, p + f"mlp.experts.{e}.")[0]
    x = x + out + np_swiglu_mlp(m, w, p + "mlp.shared_experts.")
    return x @ w["lm_head.weight"].T


def test_ernie_mtp_without_final_norm_matches_the_numpy_reference(tmp_path):

    w = ernie_checkpoint(tmp_path / "hf")
    r = run_cli("convert", "--hf-path", tmp_path / "hf", "--mlx-path", tmp_path / "mlx")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "mlx" / "mtp_config.json").read_text())
    assert cfg["family"] == "ernie4_5_moe" and cfg["final_norm"] is False and cfg["eh_bias"] is True
    toks = [5, 17, 42, 99, 7, 250, 31, 64, 12, 8, 77, 3]
    got, h, model, heads = _teacher_forced_logits(tmp_path / "mlx", toks)
    want = np_ernie_mtp_logits(w, h, w["model.embed_tokens.weight"][np.array(TOKS[1:])])
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    assert assert_drafting_is_lossless(model, heads, seed=9, drafts=(1, 2), prompts=1, tokens=16) > 0


# --- Exaone-MoE: mtp.* layout, q/k norms, a global layer without RoPE beside sliding ones --------

EXAONE = dict(model_type="exaone_moe", architectures=["ExaoneMoEForCausalLM"], vocab_size=300, hidden_size=64,
              intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, num_shared_experts=1,
              rms_norm_eps=1e-5, max_position_embeddings=512, sliding_window=64,
              layer_types=["sliding_attention", "full_attention"], is_moe_layer=[False, True], n_group=1,
              topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True, rope_theta=10000.0,
              tie_word_embeddings=False, num_nextn_predict_layers=1, torch_dtype="float32",
              bos_token_id=1, eos_token_id=2)


def exaone_checkpoint(path, seed=0):

    rng = np.random.default_rng(seed)
    c, Hd, V = EXAONE, 64, 300
    norm = lambda n: (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)  # noqa: E731
    w = {"model.embed_tokens.weight": _rand(rng, V, Hd, scale=1.0), "model.norm.weight": norm(Hd),
         "lm_head.weight": _rand(rng, V, Hd)}

    def block(p, moe):
        gqa_moe_block(w, rng, p, moe, qk_norm=True)
        if moe:
            w[p + "mlp.e_score_correction_bias"] = (0.1 * rng.standard_normal(4)).astype(np.float32)

    block("model.layers.0.", moe=False)
    block("model.layers.1.", moe=True)
    block("mtp.layers.0.", moe=True)
    for n_ in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        w[f"mtp.{n_}.weight"] = norm(Hd)
    w["mtp.fc.weight"] = _rand(rng, Hd, 2 * Hd)
    save_checkpoint(path, w, c)
    return w


def np_exaone_mtp_logits(w, hidden_pre, emb, c=EXAONE):
    """Exaone-MoE: fc([pre_fc_norm_embedding(e) ; pre_fc_norm_hidden(h)]), h post-norm
    -> a global-attention block (q/k norms, no RoPE when the model has sliding
    layers; sigmoid-routed MoE with a correction bias for the choice) -> mtp.norm -> lm_head."""
    eps, p = c["rms_norm_eps"], "mtp.layers.0."
    h = np_rms(hidden_pre, w["model.norm.weight"], eps)
    x = np.concatenate([np_rms(emb, w["mtp.pre_fc_norm_embedding.weight"], eps),
                        np_rms(h, w["mtp.pre_fc_norm_hidden.weight"], eps)], -1) @ w["mtp.fc.weight"].T
    L, nh, nkv, hd = x.shape[0], 4, 2, 16
    a = np_rms(x, w[p + "input_layernorm.weight"], eps)
    q = np_rms((a @ w[p + "self_attn.q_proj.weight"].T).reshape(L, nh, hd), w[p + "self_attn.q_norm.weight"], eps)
    k = np_rms((a @ w[p + "self_attn.k_proj.weight"].T).reshape(L, nkv, hd), w[p + "self_attn.k_norm.weight"], eps)
    v = (a @ w[p + "self_attn.v_proj.weight"].T).reshape(L, nkv, hd).transpose(1, 0, 2)
    q, k = q.transpose(1, 0, 2), k.transpose(1, 0, 2)
    x = x + np_causal_attention(q, k, v) @ w[p + "self_attn.o_proj.weight"].T
    m = np_rms(x, w[p + "post_attention_layernorm.weight"], eps)
    ww = dict(w)
    ww[p + "mlp.gate.e_score_correction_bias"] = w[p + "mlp.e_score_correction_bias"]
    cfg = dict(n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=2, routed_scaling_factor=2.5)
    x = x + np_deepseek_moe(m, ww, p + "mlp.", cfg)
    return np_rms(x, w["mtp.norm.weight"], eps) @ w["lm_head.weight"].T


def test_exaone_moe_mtp_matches_the_numpy_reference(tmp_path):

    w = exaone_checkpoint(tmp_path / "hf")
    got, h, model, heads = convert_and_read(tmp_path / "hf", tmp_path / "mlx", "exaone_moe")
    want = np_exaone_mtp_logits(w, h, w["model.embed_tokens.weight"][np.array(TOKS[1:])])
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    assert assert_drafting_is_lossless(model, heads, seed=9, drafts=(1, 2), prompts=1, tokens=16) > 0


# --- Qwen3-Next / Qwen3.5: zero-centred norms, gated attention, a recurrent backbone ---------

QNEXT = dict(model_type="qwen3_next", architectures=["Qwen3NextForCausalLM"], vocab_size=300, hidden_size=64,
             num_hidden_layers=2, full_attention_interval=2, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.25, linear_num_value_heads=4,
             linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
             num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, shared_expert_intermediate_size=32,
             mlp_only_layers=[], moe_intermediate_size=32, norm_topk_prob=True, rope_theta=10000.0,
             rms_norm_eps=1e-6, max_position_embeddings=512, tie_word_embeddings=False,
             num_nextn_predict_layers=1, torch_dtype="float32", bos_token_id=1, eos_token_id=2)
ZC_NORMS = (".input_layernorm.weight", ".post_attention_layernorm.weight", "model.norm.weight", ".q_norm.weight",
            ".k_norm.weight")


def hf_tensors(model, rng, rename=lambda k: k):
    """A random mlx-lm Qwen3-Next/3.5 model's tensors in the Hugging Face layout:
    experts unstacked, conv1d axes as stored, zero-centred norms stored as w."""
    from mlx.utils import tree_flatten

    hf = {}
    for k, v in tree_flatten(model.parameters()):
        v = np.array(v.astype(mx.float32))
        if v.ndim == 2 and k.endswith(".weight"):
            v = _rand(rng, *v.shape, scale=1.0 if "embed" in k else None)
        if ".switch_mlp." in k:
            for e in range(v.shape[0]):
                hf[rename(k.replace(".switch_mlp.", f".experts.{e}."))] = _rand(rng, *v.shape[1:])
            continue
        if "conv1d.weight" in k:
            v = np.moveaxis(v, 2, 1)
        if k.endswith(ZC_NORMS):
            v = (0.1 * rng.standard_normal(v.shape)).astype(np.float32)  # stored as w, applied as 1 + w
        hf[rename(k)] = np.ascontiguousarray(v, dtype=np.float32)
    return hf


def qwen3_next_checkpoint(path, seed=0):
    """The backbone: a random mlx-lm Qwen3-Next written back in the Hugging Face
    layout (experts unstacked, conv1d axes, norms zero-centred); the MTP layer:
    random tensors under mtp.* with zero-centred norms.  Returns the MTP tensors."""
    from mlx_lm.models import qwen3_next


    rng = np.random.default_rng(seed)
    mx.random.seed(seed)
    hf = hf_tensors(qwen3_next.Model(qwen3_next.ModelArgs.from_dict(QNEXT)), rng)
    zc = lambda n: (0.1 * rng.standard_normal(n)).astype(np.float32)  # noqa: E731
    p = "mtp.layers.0."
    mtp = {"mtp.pre_fc_norm_embedding.weight": zc(64), "mtp.pre_fc_norm_hidden.weight": zc(64),
           "mtp.fc.weight": _rand(rng, 64, 128), "mtp.norm.weight": zc(64),
           p + "input_layernorm.weight": zc(64), p + "post_attention_layernorm.weight": zc(64),
           p + "self_attn.q_proj.weight": _rand(rng, 4 * 16 * 2, 64), p + "self_attn.k_proj.weight": _rand(rng, 32, 64),
           p + "self_attn.v_proj.weight": _rand(rng, 32, 64), p + "self_attn.o_proj.weight": _rand(rng, 64, 64),
           p + "self_attn.q_norm.weight": zc(16), p + "self_attn.k_norm.weight": zc(16),
           p + "mlp.gate.weight": _rand(rng, 4, 64), p + "mlp.shared_expert_gate.weight": _rand(rng, 1, 64)}
    for m in [f"mlp.experts.{e}." for e in range(4)] + ["mlp.shared_expert."]:
        mtp[p + m + "gate_proj.weight"], mtp[p + m + "up_proj.weight"] = _rand(rng, 32, 64), _rand(rng, 32, 64)
        mtp[p + m + "down_proj.weight"] = _rand(rng, 64, 32)
    save_checkpoint(path, {**hf, **mtp}, QNEXT)
    return mtp


def np_qwen3_next_mtp_logits(w, hidden_pre, emb, final_norm, lm_head, eps=1e-6):
    """Qwen3-Next: fc([pre_fc_norm_embedding(e) ; pre_fc_norm_hidden(h)]) with h
    post-norm, every norm (1 + w) -> gated attention (q_proj gives query and gate
    per head; RoPE on a quarter of each head; output times sigmoid(gate)) ->
    softmax top-k MoE plus a sigmoid-gated shared expert (or a dense MLP) -> mtp.norm -> lm_head."""
    zrms = lambda x, g: np_rms(x, 1.0 + g, eps)  # noqa: E731
    p = "mtp.layers.0."
    h = np_rms(hidden_pre, final_norm, eps)  # the backbone's own (already shifted) final norm
    x = np.concatenate([zrms(emb, w["mtp.pre_fc_norm_embedding.weight"]),
                        zrms(h, w["mtp.pre_fc_norm_hidden.weight"])], -1) @ w["mtp.fc.weight"].T
    L, nh, nkv, hd, rot = x.shape[0], 4, 2, 16, 4
    a = zrms(x, w[p + "input_layernorm.weight"])
    qg = (a @ w[p + "self_attn.q_proj.weight"].T).reshape(L, nh, 2 * hd)
    q, gate = qg[..., :hd], qg[..., hd:].reshape(L, nh * hd)
    q = zrms(q, w[p + "self_attn.q_norm.weight"]).transpose(1, 0, 2)
    k = zrms((a @ w[p + "self_attn.k_proj.weight"].T).reshape(L, nkv, hd), w[p + "self_attn.k_norm.weight"])
    k = k.transpose(1, 0, 2)
    v = (a @ w[p + "self_attn.v_proj.weight"].T).reshape(L, nkv, hd).transpose(1, 0, 2)
    q = np.concatenate([np_rope(q[..., :rot]), q[..., rot:]], -1)
    k = np.concatenate([np_rope(k[..., :rot]), k[..., rot:]], -1)
    o = np_causal_attention(q, k, v) * (1 / (1 + np.exp(-gate)))
    x = x + o @ w[p + "self_attn.o_proj.weight"].T
    m = zrms(x, w[p + "post_attention_layernorm.weight"])
    if p + "mlp.gate_proj.weight" in w:  # a dense MTP block (Qwen3.5 dense)
        return zrms(x + np_swiglu_mlp(m, w, p + "mlp."), w["mtp.norm.weight"]) @ lm_head.T
    g = m @ w[p + "mlp.gate.weight"].T
    g = np.exp(g - g.max(-1, keepdims=True))
    g /= g.sum(-1, keepdims=True)
    out = np.zeros_like(m)
    for t in range(L):
        top = np.argsort(-g[t])[:2]
        for e, wt in zip(top, g[t, top] / g[t, top].sum()):
            out[t] += wt * np_swiglu_mlp(m[t : t + 1], w, p + f"mlp.experts.{e}.")[0]
    shared = np_swiglu_mlp(m, w, p + "mlp.shared_expert.")
    shared *= 1 / (1 + np.exp(-(m @ w[p + "mlp.shared_expert_gate.weight"].T)))
    x = x + out + shared
    return zrms(x, w["mtp.norm.weight"]) @ lm_head.T


def test_qwen3_next_zero_centred_shift_once_gated_attention_and_recurrent_rollback(tmp_path):
    from mlx_mtpd.engine import mtp_generate_step

    w = qwen3_next_checkpoint(tmp_path / "hf")
    got, h, model, heads = convert_and_read(tmp_path / "hf", tmp_path / "mlx", "qwen3_next")
    head = heads.heads[0]
    # every zero-centred norm shifted exactly once
    np.testing.assert_allclose(np.array(head.enorm.weight), 1 + w["mtp.pre_fc_norm_embedding.weight"], rtol=1e-6)
    np.testing.assert_allclose(np.array(head.norm.weight), 1 + w["mtp.norm.weight"], rtol=1e-6)
    np.testing.assert_allclose(np.array(head.block.self_attn.q_norm.weight),
                               1 + w["mtp.layers.0.self_attn.q_norm.weight"], rtol=1e-6)
    np.testing.assert_allclose(np.array(head.block.input_layernorm.weight),
                               1 + w["mtp.layers.0.input_layernorm.weight"], rtol=1e-6)
    emb = np.array(model.model.embed_tokens.weight)[np.array(TOKS[1:])]
    want = np_qwen3_next_mtp_logits(w, h, emb, np.array(model.model.norm.weight), np.array(model.lm_head.weight))
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    # linear-attention layers cannot be trimmed: their state is restored on rejections
    assert assert_drafting_is_lossless(model, heads, seed=2) > 0
    rng = np.random.default_rng(2)
    # a partial acceptance (2 of 3 lookup drafts right) restores and replays the recurrent state
    from mlx_mtpd.engine import DraftState, _step

    prompt = rng.integers(3, 300, size=8).tolist()
    ref = greedy_tokens(model, prompt, 14)
    st = DraftState(model, heads, 1)
    assert [t for t, _, _ in mtp_generate_step(mx.array(prompt), model, heads, num_draft=1, max_tokens=1,
                                               state=st)] == ref[:1]
    new, a, _, _ = _step(st, 0, None, lookup=[ref[1], ref[2], (ref[3] + 1) % 300])
    assert a == 2 and new == ref[1:4]
    more = [t for t, _, _ in mtp_generate_step(mx.array(prompt + ref[:4]), model, heads, num_draft=2,
                                               max_tokens=10, state=st)]
    assert more == ref[4:14]


def test_imported_heads_fine_tune_and_extend_with_mtpd(mimo_ckpt, tmp_path):
    """`train --init-from` on a native MiMo head set: fine-tuning keeps its
    conventions and changes its weights; --extend-to 2 copies it and trains only the copy."""
    from mlx_mtpd.utils import HEADS_WEIGHTS

    rng = np.random.default_rng(0)
    data = tmp_path / "data.jsonl"
    with open(data, "w") as f:
        for i in range(16):
            toks = rng.integers(3, 300, size=int(rng.integers(20, 40))).tolist()
            f.write(json.dumps({"id": str(i), "prompt_tokens": toks[:5], "completion_tokens": toks[5:],
                                "finish_reason": "stop"}) + "\n")
    common = ["--model", mimo_ckpt / "mlx", "--data", data, "--top-n", 64, "--batch-size", 2, "--seq-len", 64,
              "--eval-every", 0, "--warmup", 1, "--steps", 3, "--cache-dir", tmp_path / "cache"]
    r = run_cli("train", *common, "--out", tmp_path / "ft", "--init-from", mimo_ckpt / "mlx")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "ft" / "mtp_config.json").read_text())
    assert cfg["family"] == "mimo" and cfg["concat_order"] == "hidden_embedding"
    before = mx.load(str(mimo_ckpt / "mlx" / HEADS_WEIGHTS))
    after = mx.load(str(tmp_path / "ft" / HEADS_WEIGHTS))
    assert not np.array_equal(np.array(before["heads.0.eh_proj.weight"]), np.array(after["heads.0.eh_proj.weight"]))
    r = run_cli("train", *common, "--out", tmp_path / "ext", "--init-from", mimo_ckpt / "mlx", "--extend-to", 2)
    assert r.returncode == 0, r.stderr
    ext = mx.load(str(tmp_path / "ext" / HEADS_WEIGHTS))
    for k, v in before.items():  # the imported head stays as it was
        if k.startswith("heads.0."):
            np.testing.assert_array_equal(np.array(v.astype(mx.float32)), np.array(ext[k].astype(mx.float32)))
    assert json.loads((tmp_path / "ext" / "mtp_config.json").read_text())["num_heads"] == 2


Q35_TEXT = dict(model_type="qwen3_5_text", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, vocab_size=300,
                max_position_embeddings=512, linear_num_value_heads=4, linear_num_key_heads=2,
                linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
                tie_word_embeddings=False, full_attention_interval=2, mtp_num_hidden_layers=1,
                rope_parameters={"type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})
Q35 = dict(model_type="qwen3_5", architectures=["Qwen3_5ForConditionalGeneration"], text_config=Q35_TEXT,
           tie_word_embeddings=False, torch_dtype="float32", bos_token_id=1, eos_token_id=2)


def qwen35_checkpoint(src):
    """A tiny Qwen3.5 (dense) checkpoint in the Hugging Face layout: the text
    model inside the multimodal wrapper, recurrent and attention layers, one
    dense MTP block.  Returns the MTP block's tensors."""
    from mlx_lm.models import qwen3_5

    from conftest import byte_tokenizer

    rng = np.random.default_rng(5)
    mx.random.seed(5)
    hf = hf_tensors(qwen3_5.Model(qwen3_5.ModelArgs.from_dict(Q35)), rng,
                    lambda k: k.replace("language_model.model.", "model.language_model.").replace(
                        "language_model.lm_head", "lm_head"))
    zc = lambda n: (0.1 * rng.standard_normal(n)).astype(np.float32)  # noqa: E731
    p = "mtp.layers.0."
    w = {"mtp.pre_fc_norm_embedding.weight": zc(64), "mtp.pre_fc_norm_hidden.weight": zc(64),
         "mtp.fc.weight": _rand(rng, 64, 128), "mtp.norm.weight": zc(64),
         p + "input_layernorm.weight": zc(64), p + "post_attention_layernorm.weight": zc(64),
         p + "self_attn.q_proj.weight": _rand(rng, 128, 64), p + "self_attn.k_proj.weight": _rand(rng, 32, 64),
         p + "self_attn.v_proj.weight": _rand(rng, 32, 64), p + "self_attn.o_proj.weight": _rand(rng, 64, 64),
         p + "self_attn.q_norm.weight": zc(16), p + "self_attn.k_norm.weight": zc(16),
         p + "mlp.gate_proj.weight": _rand(rng, 128, 64), p + "mlp.up_proj.weight": _rand(rng, 128, 64),
         p + "mlp.down_proj.weight": _rand(rng, 64, 128)}
    src.mkdir(parents=True)
    write_safetensors(src / "model.safetensors", {**hf, **w})
    (src / "config.json").write_text(json.dumps(Q35))
    byte_tokenizer(300).save_pretrained(str(src))
    return w


def test_qwen35_dense_wrapped_text_model(tmp_path):
    """Qwen3.5 (dense): the text model inside a multimodal wrapper, its config
    under text_config, a dense MTP block; norms shifted exactly once although
    mlx-lm's sanitize does not recognize a lone block as raw."""
    src = tmp_path / "hf"
    w = qwen35_checkpoint(src)
    p = "mtp.layers.0."
    got, h, model, heads = convert_and_read(src, tmp_path / "mlx", "qwen3_next")
    np.testing.assert_allclose(np.array(heads.heads[0].block.post_attention_layernorm.weight),
                               1 + w[p + "post_attention_layernorm.weight"], rtol=1e-6)
    lm = model.language_model
    emb = np.array(lm.model.embed_tokens.weight)[np.array(TOKS[1:])]
    want = np_qwen3_next_mtp_logits(w, h, emb, np.array(lm.model.norm.weight), np.array(lm.lm_head.weight))
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    assert assert_drafting_is_lossless(model, heads, seed=9, drafts=(1, 2), prompts=1, tokens=16) > 0
