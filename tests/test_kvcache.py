"""mlx-lm's KV cache options and drafting past sliding windows
(mlx_mtpd.kvcache): greedy output equal to plain mlx-lm decoding with its own
caches and the same options, on contexts two to four times the window, with
head drafts, long lookup drafts and trees; the sampled distribution over a
context past the window; the options on the command line."""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import numpy as np
import pytest

from conftest import run_cli, tiny_model
from heads_util import fit_heads
from mlx_mtpd.engine import TIE_TOLERANCE, DraftPlanner, DraftState, SpecStats
from mlx_mtpd.errors import MTPDError
from mlx_mtpd.kvcache import KVOptions, WindowKVCache
from mlx_mtpd.suffix import AnswerMemory
from test_engine import _chi2_pvalue, assert_lossless, spec_tokens


def plain_tokens(model, prompt, n, kv: Optional[KVOptions] = None, **sampling):
    """mlx-lm's own generate_step with the same cache options."""
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    kv = kv or KVOptions()
    return [int(t) for t, _ in generate_step(
        mx.array(prompt), model, max_tokens=n, sampler=make_sampler(**sampling) if sampling else None,
        max_kv_size=kv.max_kv_size, kv_bits=kv.kv_bits, kv_group_size=kv.kv_group_size,
        quantized_kv_start=kv.quantized_kv_start)]


def _windows(st: DraftState):
    return [c for c in st.cache if isinstance(c, WindowKVCache)]


def _prompts(rng, vocab):
    # a random prompt, and one that repeats a phrase (long lookup drafts)
    phrase = rng.integers(3, vocab, size=7).tolist()
    return [rng.integers(3, vocab, size=10).tolist(), phrase * 3 + phrase[:2]]


@pytest.mark.parametrize("arch", ["gemma3_text", "gpt_oss", "mistral_swa"])
def test_drafting_past_the_sliding_window_is_lossless(arch):
    """Window 16, contexts of 60-80 tokens (up to 5 windows): heads (fixed D,
    with and without trees), the suffix index and `auto` keep drafting after the
    window has wrapped, and every output equals mlx-lm's with its rotating caches."""
    model, _ = tiny_model(arch, vocab_size=300, seed=2)
    rng = np.random.default_rng(0)
    prompts = _prompts(rng, 300)
    refs = [plain_tokens(model, p, 50) for p in prompts]
    heads = fit_heads(model, [p + r for p, r in zip(prompts, refs)], num_heads=2)
    for p, ref in zip(prompts, refs):
        for d, draft, tree in [(3, "heads", None), (2, "heads", "auto"), (8, "prompt-lookup", None),
                               ("auto", "heads+lookup", "auto")]:
            st = DraftState(model, heads if draft != "prompt-lookup" else None, 6 if draft != "prompt-lookup" else 0)
            if draft != "heads":  # the answer was given before (a chat's memory): long lookup drafts
                st.memory = AnswerMemory()
                st.memory.add(ref)
            stats = SpecStats()
            planner = DraftPlanner("auto", draft, tree=tree).seed(
                acceptance=[0.9, 0.8], costs={"plain": 0.1, "heads": {"1": 0.1, "2": 0.1}, "lookup": {"8": 0.1}}
            ) if d == "auto" else None
            got = spec_tokens(model, p, 50, heads if draft != "prompt-lookup" else None, d, stats=stats,
                              state=st, draft=draft, tree=tree, planner=planner)
            assert_lossless(model, p, got, ref, TIE_TOLERANCE[mx.float32])
            assert stats.fallback is None, stats.fallback
            wins = _windows(st)
            assert wins and all(c.offset > 3 * c.max_size for c in wins)
            # drafting went on past the window
            assert stats.rounds >= 5 and sum(stats.accepted) >= 10, (arch, d, draft, stats.sources)
            if draft == "prompt-lookup":
                assert max(i for i, a in enumerate(stats.accepted) if a) >= 5  # long drafts accepted


def test_a_chat_past_the_window_keeps_its_caches_across_turns():
    """Three turns through one state on gemma3 (window 16): each turn's prompt
    extends the last (the caches rewound to the common prefix where the window
    allows, else rebuilt), each answer equal to mlx-lm decoding the whole
    conversation afresh."""
    model, _ = tiny_model("gemma3_text", vocab_size=300, seed=3)
    rng = np.random.default_rng(4)
    st = DraftState(model, None, 0)
    conv = rng.integers(3, 300, size=12).tolist()
    for _ in range(3):
        ref = plain_tokens(model, conv, 24)
        stats = SpecStats()
        got = spec_tokens(model, conv, 24, None, 6, stats=stats, state=st, draft="prompt-lookup")
        assert_lossless(model, conv, got, ref, TIE_TOLERANCE[mx.float32])
        conv = conv + got + rng.integers(3, 300, size=5).tolist()


@pytest.mark.parametrize("max_kv_size,prompt_len", [(24, 10), (24, 40), (32, 70)])
def test_max_kv_size_equals_mlx_lm(max_kv_size, prompt_len):
    """--max-kv-size on a model without caches of its own (qwen2: a rotating
    cache per layer, 4 first positions kept; mlx-lm's llama makes its own and
    ignores the option, as this project then does): prompts shorter and longer
    than it, heads and long lookup drafts verified past it, equal to mlx-lm
    with the option."""
    model, _ = tiny_model("qwen2", vocab_size=300, seed=3)
    rng = np.random.default_rng(prompt_len)
    phrase = rng.integers(3, 300, size=9).tolist()
    prompt = (phrase * 10)[:prompt_len]
    kv = KVOptions(max_kv_size=max_kv_size)
    ref = plain_tokens(model, prompt, 60, kv)
    assert ref != plain_tokens(model, prompt, 60)  # the option changes the output: the test can fail
    heads = fit_heads(model, [prompt + ref], num_heads=2)
    for d, draft in [(3, "heads"), (12, "prompt-lookup"), (4, "heads+lookup")]:
        stats = SpecStats()
        st = DraftState(model, heads if draft != "prompt-lookup" else None, d if draft != "prompt-lookup" else 0,
                        kv=kv)
        if draft != "heads":
            st.memory = AnswerMemory()
            st.memory.add(ref)
        got = spec_tokens(model, prompt, 60, heads if draft != "prompt-lookup" else None, d, stats=stats, state=st,
                          draft=draft, kv=kv)
        assert_lossless(model, prompt, got, ref, TIE_TOLERANCE[mx.float32])
        assert all(isinstance(c, WindowKVCache) and c.offset > max_kv_size for c in st.cache)
        assert stats.rounds >= 5, (d, draft, stats.sources)
        if draft != "heads":
            assert sum(stats.accepted) >= 20, (d, draft, stats.sources)


@pytest.mark.parametrize("bits,start", [(8, 0), (8, 30), (4, 0)])
def test_kv_bits_equals_mlx_lm(bits, start):
    """--kv-bits: the cache is quantized after the forward that reaches
    --quantized-kv-start, as mlx-lm does; drafted and verified through it, the
    output equals mlx-lm's with the same options (a difference only on a near
    tie: quantized attention over a different number of queries)."""
    from mlx_lm.models.cache import QuantizedKVCache

    model, _ = tiny_model("llama_hd64", vocab_size=300, seed=4)
    rng = np.random.default_rng(bits + start)
    phrase = rng.integers(3, 300, size=8).tolist()
    prompt = phrase * 2 + phrase[:3]
    kv = KVOptions(kv_bits=bits, kv_group_size=32 if bits == 4 else 64, quantized_kv_start=start)
    ref = plain_tokens(model, prompt, 50, kv)
    heads = fit_heads(model, [prompt + ref], num_heads=2)
    for d, draft in [(3, "heads"), (8, "prompt-lookup")]:
        stats = SpecStats()
        st = DraftState(model, heads if draft == "heads" else None, d if draft == "heads" else 0, kv=kv)
        if draft != "heads":
            st.memory = AnswerMemory()
            st.memory.add(ref)
        got = spec_tokens(model, prompt, 50, heads if draft == "heads" else None, d, stats=stats, state=st,
                          draft=draft, kv=kv)
        assert_lossless(model, prompt, got, ref, 0.05)
        assert all(isinstance(c, QuantizedKVCache) and c.bits == bits for c in st.cache)
        assert stats.rounds >= 2 and sum(stats.accepted) >= 10, (d, draft, stats.sources)


def test_sampling_past_the_window_matches_the_backbone_distribution():
    """Sampling (T = 0.6) on gemma3 with a 16-token window over a 20-token prompt
    that repeats itself, drafting from the conversation and with heads: each of
    the first three tokens' marginals against the exact ones (the full forward
    masks the window exactly as the caches must), chi-square, p > 1e-3."""
    from mlx_mtpd.engine import make_logprobs_transform
    from test_engine import _exact_marginals

    model, _ = tiny_model("gemma3_text", vocab_size=24, seed=5)
    params = dict(temp=0.6)
    transform = make_logprobs_transform(**params)
    prompt = [5, 9, 14, 3, 20, 7, 11] * 3 + [5]  # 22 tokens: past the window of 16
    marg = _exact_marginals(model, prompt, transform)
    greedy = plain_tokens(model, prompt, 20)
    heads = fit_heads(model, [prompt + greedy], num_heads=2, ridge=1.0)
    mx.random.seed(99)
    N, V = 1200, 24
    for draft, heads_ in (("prompt-lookup", None), ("heads", heads)):
        counts = np.zeros((3, V))
        stats = SpecStats()
        st = DraftState(model, heads_, 3 if heads_ is not None else 0)  # kept across runs: rewound each time
        if heads_ is None:  # the greedy answer was given before: drafts of 3 from the memory
            st.memory = AnswerMemory()
            st.memory.add(prompt + greedy)
        for _ in range(N):
            for i, t in enumerate(spec_tokens(model, prompt, 3, heads_, 3, stats=stats, draft=draft, state=st,
                                              **params)):
                counts[i, t] += 1
        assert sum(stats.accepted) > 100, (draft, stats.accepted)
        for i in range(3):
            p = _chi2_pvalue(counts[i], marg[i])
            assert p > 1e-3, (draft, i, p)


def test_kv_options_bad_input():
    with pytest.raises(MTPDError, match="--kv-bits 7"):
        KVOptions(kv_bits=7)
    with pytest.raises(MTPDError, match="--max-kv-size 2"):
        KVOptions(max_kv_size=2)
    with pytest.raises(MTPDError, match="--kv-group-size 48"):
        KVOptions(kv_group_size=48)


def test_cache_options_on_the_command_line(smol_path):
    """generate with mlx-lm's cache options on the real model: --max-kv-size
    smaller than the conversation still drafts from it (the answer repeats the
    prompt's list), and the answer equals mlx-lm's with the same options."""
    from mlx_lm import load
    from mlx_lm.generate import generate as lm_generate

    items = ", ".join(f"item {i}" for i in range(1, 41))
    prompt = f"Repeat this list exactly: {items}"
    r = run_cli("generate", "--model", smol_path, "--prompt", prompt, "--max-tokens", 120, "--max-kv-size", 96,
                "--verbose", "true")
    assert r.returncode == 0, r.stderr
    model, tok = load(str(smol_path))
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                   tokenize=False)
    ref = lm_generate(model, tok, text, max_tokens=120, max_kv_size=96)
    assert ref.strip() and ref.strip() in r.stdout, (ref, r.stdout)
    assert "lookup" in r.stdout + r.stderr
    r = run_cli("generate", "--model", smol_path, "--prompt", "hi", "--kv-bits", "7")
    assert r.returncode != 0 and "--kv-bits 7" in r.stderr and "Traceback" not in r.stderr


def test_a_long_chat_keeps_drafting_from_the_turns_it_dropped(smol):
    """When the conversation outgrows the context, the oldest turns leave the
    prompt; what the user said in them stays a draft source (the answer
    memory), so a later answer that quotes it still drafts from it."""
    from mlx_mtpd.session import Session

    model, tok = smol[0], smol[1]
    session = Session(model, tok, None, num_draft="auto", memory=True, max_context=100)
    passage = PASSAGE_FOR_MEMORY
    msgs = [{"role": "user", "content": passage}, {"role": "assistant", "content": "Noted."},
            {"role": "user", "content": "Now quote the passage I gave you."}]
    fitted, ids, dropped = session.fit_messages(msgs, max_tokens=120)
    assert dropped == 1 and fitted == msgs[2:] and len(ids) + 16 <= 100
    p = tok.encode(passage, add_special_tokens=False)
    proposal = session.state.memory.propose(16, p[:40])
    assert proposal.tokens == p[40:56], (proposal.tokens, p[40:56])


PASSAGE_FOR_MEMORY = (
    "Every morning the baker lit the oven before the sun rose, kneaded forty loaves by hand, and set them "
    "on the long wooden shelf to rise while the town slept. By seven the street smelled of warm bread, and "
    "the first customers, the fishermen and the night nurses, lined up at the door with their baskets."
)


def test_prompt_cache_file_from_mlx_lm(smol_path, smol, tmp_path):
    """A prompt cache written by mlx-lm's cache_prompt (through `mlx_mtpd
    cache-prompt`): `generate --prompt-cache-file` continues it, drafting, and
    answers what mlx-lm answers from the same file."""
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import load_prompt_cache

    context = "Here is a shopping list: " + ", ".join(f"{n} apples" for n in range(2, 30)) + "."
    question = "Repeat the shopping list, every item."
    f = tmp_path / "ctx.safetensors"
    r = run_cli("cache-prompt", "--model", smol_path, "--prompt", context, "--prompt-cache-file", f)
    assert r.returncode == 0 and f.exists(), r.stderr
    r = run_cli("generate", "--prompt-cache-file", f, "--prompt", question, "--max-tokens", 80,
                "--verbose", "true")
    assert r.returncode == 0, r.stderr
    # mlx_lm.generate's own reading of the same file and prompt
    model, tok = smol
    cache, meta = load_prompt_cache(str(f), return_metadata=True)
    assert meta["model"] == str(smol_path)
    msgs = [{"role": "user", "content": question}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    msgs[-1]["content"] = "<query>"
    text = text[tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True).index("<query>"):]
    ids = tok.encode(text, add_special_tokens=False)
    ref = []
    for t, _ in generate_step(mx.array(ids), model, max_tokens=80, prompt_cache=cache):
        if int(t) in tok.eos_token_ids:
            break
        ref.append(int(t))
    want = tok.decode(ref).strip()
    assert want and want in r.stdout, (want, r.stdout)
    assert "prompt cache:" in r.stderr and "tau" in r.stdout
    # bad input: one line each
    bad = run_cli("generate", "--prompt-cache-file", tmp_path / "none.safetensors", "--prompt", "x")
    assert bad.returncode != 0 and "not found" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_cli("generate", "--prompt-cache-file", f, "--model", tmp_path, "--prompt", "x")
    assert bad.returncode != 0 and "made for" in bad.stderr and "Traceback" not in bad.stderr
