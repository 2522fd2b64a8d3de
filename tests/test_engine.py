"""The speculative decoding loop: losslessness (greedy and sampled), cache
rollback, acceptance statistics and bad input."""

from __future__ import annotations

import json
import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from conftest import greedy_tokens, run_cli, tiny_model
from heads_util import fit_heads
from mlx_mtpd.engine import TIE_TOLERANCE, DraftPlanner, DraftState, SpecStats, mtp_generate_step
from mlx_mtpd.errors import MTPDError
from mlx_mtpd.heads import init_heads

# Each prompt runs at two D and one loop policy, alternating, on 10 of the 20
# chat prompts, so each D is checked on 4 prompts and each loop policy on 5 (the
# full product would take the test suite past its time budget on a 2-core
# CPU).  MLX_MTPD_FULL_GRID=1 runs the full product: 20 prompts x 5 D x both
# loop policies.
FULL_GRID = os.environ.get("MLX_MTPD_FULL_GRID") == "1"

ALL_PROMPTS = [
    "Write a haiku about autumn leaves.",
    "What is the capital of France?",
    "Explain photosynthesis in two sentences.",
    "Give me three tips for learning Python.",
    "Translate 'good morning' into Spanish.",
    "What is 17 times 23?",
    "Name the planets of the solar system.",
    "Write a limerick about a cat.",
    "How does a bicycle stay upright?",
    "Summarize the plot of Romeo and Juliet.",
    "What causes rain?",
    "Write a Python function that reverses a string.",
    "Why is the sky blue?",
    "Describe a sunset over the ocean.",
    "List five fruits that are red.",
    "What is the boiling point of water?",
    "Tell me a fun fact about octopuses.",
    "How do I make a cup of tea?",
    "What is machine learning?",
    "Write the opening line of a mystery novel.",
]


def spec_tokens(model, prompt, n, heads, num_draft, loop=None, stats=None, state=None, **kw):
    return [
        t for t, _, _ in mtp_generate_step(
            mx.array(prompt), model, heads, num_draft=num_draft, loop=loop, max_tokens=n,
            stats=stats, state=state, **kw,
        )
    ]


def assert_lossless(model, prompt, got, ref, tol):
    """Identical, or the first difference sits on a near-tie of the backbone's
    top-two logits (docs/DESIGN.md, "The contract"); anything else is a bug."""
    if got == ref:
        return
    i = next(i for i, (a, b) in enumerate(zip(got, ref)) if a != b) if len(got) == len(ref) else None
    assert i is not None, (got, ref)
    logits = model(mx.array(list(prompt) + ref[:i])[None])[0, -1].astype(mx.float32)
    top2 = mx.sort(logits)[-2:]
    gap = (top2[1] - top2[0]).item()
    assert gap < tol, f"difference at {i} with top-two gap {gap:.4g} >= {tol}: {got} vs {ref}"


@pytest.fixture(scope="module")
def smol_chat(smol):
    model, tok = smol
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
        for p in (ALL_PROMPTS if FULL_GRID else ALL_PROMPTS[::2])
    ]
    return model, tok, prompts


@pytest.fixture(scope="module")
def smol_refs(smol_chat):
    model, _, prompts = smol_chat
    return [greedy_tokens(model, p, N_SMOL) for p in prompts]


N_SMOL = 10
DRAFTS = [1, 2, 3, 5, 8]
FIT = 12 if FULL_GRID else 6  # prompts the high-acceptance heads are fitted on


def _loops(i):
    return ("last", "cycle") if FULL_GRID else (("last", "cycle")[i % 2],)


def _drafts(i):
    """Every D on every prompt in the full grid; else two D per prompt."""
    return DRAFTS if FULL_GRID else (DRAFTS[i % 5], DRAFTS[(i + 2) % 5])


def test_smollm_greedy_untrained_heads(smol_chat, smol_refs):
    """Chat prompts x D in {1,2,3,5,8} x loop policies: acceptance near 0."""
    model, _, prompts = smol_chat
    heads = init_heads(model, 2, draft_vocab=8192)
    total = SpecStats()
    for i, (p, ref) in enumerate(zip(prompts, smol_refs)):
        for d in _drafts(i):
            for loop in _loops(i):
                stats = SpecStats()
                got = spec_tokens(model, p, N_SMOL, heads, d, loop=loop, stats=stats)
                assert_lossless(model, p, got, ref, TIE_TOLERANCE[mx.float32])
                total.add(stats)
    assert total.rounds > 100
    assert sum(total.accepted) / total.rounds < 0.2  # untrained heads rarely guess right


def test_smollm_greedy_high_acceptance_heads(smol_chat, smol_refs):
    """Heads fitted to the backbone's own text: many accepts and rejects, every
    D and loop policy, output identical to plain greedy decoding."""
    model, _, prompts = smol_chat
    heads = fit_heads(model, [p + r for p, r in zip(prompts[:FIT], smol_refs[:FIT])], num_heads=2)
    accepted = rounds = 0
    for i, (p, ref) in enumerate(zip(prompts, smol_refs)):
        for d in _drafts(i + 1):
            for loop in _loops(i + 1):
                stats = SpecStats()
                got = spec_tokens(model, p, N_SMOL, heads, d, loop=loop, stats=stats)
                assert_lossless(model, p, got, ref, TIE_TOLERANCE[mx.float32])
                accepted += stats.accepted[0] if stats.accepted else 0
                rounds += stats.rounds
    assert 0.3 < accepted / rounds < 1.0, accepted / rounds  # both paths exercised


ARCHS = ["llama", "qwen2", "qwen3", "gemma3_text", "phi3"]


@pytest.mark.parametrize("quant", [None, 4, 8, "fused"])
@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_architectures_greedy(arch, quant):
    """Greedy equality on every architecture, float and quantized, and with
    heads that fuse an earlier layer's output (`fused`)."""
    model, config = tiny_model(arch, vocab_size=300, seed=1)
    features = [0] if quant == "fused" else None
    quant = None if quant == "fused" else quant
    if quant:
        nn.quantize(model, group_size=32, bits=quant)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, 300, size=int(rng.integers(4, 12))).tolist() for _ in range(6)]
    refs = [greedy_tokens(model, p, 20) for p in prompts]
    heads = fit_heads(model, [p + r for p, r in zip(prompts[:4], refs[:4])], num_heads=2, features=features)
    tol = TIE_TOLERANCE[mx.float32] if quant is None else 0.05
    rounds = accepted = 0
    for p, ref in zip(prompts, refs):
        for d, loop in [(1, "last"), (3, "last"), (3, "cycle"), (5, "cycle")]:
            stats = SpecStats()
            got = spec_tokens(model, p, 20, heads, d, loop=loop, stats=stats)
            assert_lossless(model, p, got, ref, tol)
            rounds += stats.rounds
            accepted += sum(stats.accepted)
    assert rounds > 0 and accepted > 0


def _recomputed_depth_keys(model, heads, tokens, committed, depth, loop):
    """Depth caches from scratch, teacher-forced on the accepted tokens."""
    from mlx_lm.models.cache import KVCache

    from mlx_mtpd.heads import Backbone

    bb = Backbone(model, heads.features)
    _, h = bb.forward(mx.array(tokens[:-1]), None)  # h_j for j = 0..len-2
    out = []
    entry = heads.entry_hidden(bb)
    prev = entry(h) if entry is not None else h
    for k in range(1, depth + 1):
        c = committed[k]
        head = heads.head_for_depth(k, loop)
        cache = KVCache()
        tok = mx.array(tokens[k : c + k])
        prev = head(prev[:c], bb.embed_tokens(tok), cache)
        out.append((cache.keys[..., :c, :], cache.values[..., :c, :]))
    return out


@pytest.mark.parametrize("loop,features", [("last", None), ("cycle", [0])])
def test_cache_rollback_equals_recomputation(loop, features):
    """The depth caches after decoding equal a recomputation from scratch (with
    fused heads too: the fused layers' outputs kept in the hidden tails)."""
    model, _ = tiny_model("llama", vocab_size=300, seed=3)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 300, size=8).tolist() for _ in range(4)]
    refs = [greedy_tokens(model, p, 30) for p in prompts]
    heads = fit_heads(model, [p + r for p, r in zip(prompts[:2], refs[:2])], num_heads=2, loop=loop,
                      features=features)
    for p in prompts:
        for n_tokens in (7, 19, 30):
            st = DraftState(model, heads, 4, loop)
            stats = SpecStats()
            spec_tokens(model, p, n_tokens, heads, 4, loop=loop, stats=stats, state=st)
            _check_depth_caches(st, model, heads, loop)
            assert st.cache[0].offset == len(st.tokens) - 1


def _check_depth_caches(st, model, heads, loop):
    want = _recomputed_depth_keys(model, heads, st.tokens, st.depths.committed, st.max_depth, loop)
    for k in range(st.max_depth):
        cache = st.depths.caches[k]
        c = st.depths.committed[k + 1]
        assert cache.offset == c
        if c == 0:
            continue
        keys, values = cache.state[0][..., :c, :], cache.state[1][..., :c, :]
        np.testing.assert_allclose(np.array(keys), np.array(want[k][0]), rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(np.array(values), np.array(want[k][1]), rtol=1e-3, atol=1e-3)


def test_heads_catch_up_after_long_lookup_steps():
    """heads+lookup drafting from an earlier answer (the answer memory) that the
    model now repeats with two changes: lookup steps of up to 12 tokens accepted
    whole, rejected mid-draft and cut by the token budget, with head steps
    between them; the depth caches still equal recomputation and the output is
    plain greedy decoding's."""
    from mlx_mtpd.suffix import AnswerMemory

    model, _ = tiny_model("llama", vocab_size=300, seed=3)
    rng = np.random.default_rng(2)
    base = rng.integers(3, 300, size=10).tolist()
    ref = greedy_tokens(model, base, 40)
    heads = init_heads(model, 2)  # heads that rarely guess right: lookup wins wherever it proposes
    earlier = base + ref[:12] + [7] + ref[13:25] + [9] + ref[26:]  # what was said before, a bit different
    total = SpecStats()
    for n_tokens in (33, 24):
        st = DraftState(model, heads, 12, "last")
        st.memory = AnswerMemory()
        st.memory.add(earlier)
        stats = SpecStats()
        prompt = base + ref[:3]
        got = spec_tokens(model, prompt, n_tokens, heads, 12, stats=stats, state=st, draft="heads+lookup",
                          loop="last")
        assert_lossless(model, prompt, got, greedy_tokens(model, prompt, n_tokens), TIE_TOLERANCE[mx.float32])
        _check_depth_caches(st, model, heads, "last")
        total.add(stats)
    assert total.sources.get("lookup", 0) >= 4 and total.sources.get("heads", 0) >= 2, total.sources
    assert len(total.accepted) >= 9 and total.accepted[8] >= 2  # runs of 9+ accepted lookup drafts
    assert any(r > a for r, a in zip(total.reached[1:], total.accepted[1:]))  # a rejection mid-draft


def test_a_deeper_draft_is_not_timed_while_its_depth_catches_up():
    """The first step that uses a deeper depth catches that depth up over the
    whole context: its time is not a typical step's cost, and is not recorded
    (one such time once kept `auto` from ever drafting two tokens)."""
    model, _ = tiny_model("llama", vocab_size=300, seed=5)
    heads = init_heads(model, 3)
    seen = []

    class Scripted(DraftPlanner):
        def plan(self, st, remaining):  # D = 1 for six steps, then D = 2, then D = 3
            n = len(seen)
            return "heads", 1 if n < 6 else 2 if n < 10 else 3, None

        def observe(self, kind, d, accepted, seconds, match=0):
            seen.append((d, seconds))
            super().observe(kind, d, accepted, seconds, match)

    prompt = list(range(3, 60))
    planner = Scripted("auto", "heads", max_draft=3)
    got = spec_tokens(model, prompt, 30, heads, "auto", planner=planner)
    assert got == greedy_tokens(model, prompt, 30)
    first = {d: next(i for i, (dd, _) in enumerate(seen) if dd == d) for d in (1, 2, 3)}
    assert all(seen[first[d]][1] is None for d in (2, 3)), seen  # a depth's first use: not timed
    assert seen[first[2] + 1][1] is not None and seen[first[3] + 1][1] is not None, seen


def test_state_kept_across_turns_prefills_only_new_tokens():
    """A chat's next turn extends the cached conversation (or edits its end):
    the caches rewind to the common prefix, only the rest is prefilled, the
    depth caches equal recomputation, and the output is plain greedy decoding's."""
    model, _ = tiny_model("llama", vocab_size=300, seed=3)
    rng = np.random.default_rng(1)
    turn1 = rng.integers(3, 300, size=9).tolist()
    ref1 = greedy_tokens(model, turn1, 20)
    heads = fit_heads(model, [turn1 + ref1], num_heads=2)
    for loop in ("last", "cycle"):
        st = DraftState(model, heads, 4, loop)
        planner = DraftPlanner(4, "heads")
        assert spec_tokens(model, turn1, 20, heads, 4, loop=loop, state=st, planner=planner) == ref1
        turn2 = turn1 + ref1 + rng.integers(3, 300, size=5).tolist()
        cached = len(turn1) + len(ref1) - 1
        assert st.rewind(turn2) == cached  # everything the cache holds is reused
        assert st.length == cached and st.cache[0].offset == cached
        got2 = spec_tokens(model, turn2, 15, heads, 4, loop=loop, state=st, planner=planner)
        assert_lossless(model, turn2, got2, greedy_tokens(model, turn2, 15), TIE_TOLERANCE[mx.float32])
        _check_depth_caches(st, model, heads, loop)
        # an edit of an earlier turn: rewind deeper than the depth caches' tails
        turn3 = turn1[:6] + rng.integers(3, 300, size=4).tolist()
        got3 = spec_tokens(model, turn3, 15, heads, 4, loop=loop, state=st, planner=planner)
        assert_lossless(model, turn3, got3, greedy_tokens(model, turn3, 15), TIE_TOLERANCE[mx.float32])
        _check_depth_caches(st, model, heads, loop)
        # a different conversation altogether: nothing reused, still exact
        turn4 = rng.integers(3, 300, size=7).tolist()
        assert st.rewind(turn4) == 0 and st.length == 0
        got4 = spec_tokens(model, turn4, 10, heads, 4, loop=loop, state=st, planner=planner)
        assert got4 == greedy_tokens(model, turn4, 10)


class _FakeState:
    def __init__(self, tokens):
        from mlx_mtpd.suffix import SuffixIndex

        self.tokens, self.max_depth, self.index = tokens, 6, SuffixIndex(tokens)

    def can_verify(self, d):
        return True


def test_auto_planner_drafts_only_when_it_pays():
    st = _FakeState(list(range(50)))
    pl = DraftPlanner("auto", "heads")
    assert pl.plan(st, 500)[0] == "plain"  # plain decoding is measured first
    pl.observe_plain(8, 8 * 0.500)  # the first burst warms up: not timed
    assert pl.plan(st, 500)[0] == "plain"
    pl.observe_plain(8, 8 * 0.050)
    kind, d, _ = pl.plan(st, 500)
    assert kind == "heads" and d >= 1  # an optimistic prior tries drafting
    for _ in range(6):  # heads that accept nothing, a step 20% dearer than a token
        pl.observe("heads", d, 0, 0.060)
    plans = [pl.plan(st, 500) for _ in range(160)]
    plain = sum(a for k, a, _ in plans if k == "plain")
    drafting = [p for p in plans if p[0] != "plain"]
    assert plain >= 128 * len(drafting) - 8 and 1 <= len(drafting) <= plain / 128 + 1  # one probe per 128
    # nothing near paying: long bursts (each burst restarts the pipeline), never past the next probe
    assert max(a for k, a, _ in plans if k == "plain") == 32
    # heads that accept almost everything: drafting, deeper than one token
    pl2 = DraftPlanner("auto", "heads")
    pl2.observe_plain(8, 8 * 0.050)
    pl2.observe_plain(8, 8 * 0.050)
    for d in (1, 2, 3, 4, 5, 6):
        for _ in range(5):
            pl2.observe("heads", d, d, 0.050 + 0.006 * d)
    pl2.observe_plain(8, 8 * 0.050)
    kind, d, _ = pl2.plan(st, 500)
    assert kind == "heads" and d >= 4
    # while drafting wins by far (a long repeat), plain decoding is not re-timed ...
    for _ in range(30):
        pl2.observe("heads", d, d, 0.050 + 0.006 * d)
    assert pl2.clock.drafted_since_plain >= 128 and pl2.plan(st, 500)[0] == "heads"
    # ... but where the gain is marginal, it is timed again every 128 drafted tokens
    pl3 = DraftPlanner("auto", "heads")
    pl3.observe_plain(8, 8 * 0.050)
    pl3.observe_plain(8, 8 * 0.050)
    for i in range(60):  # AR_1 0.5 at 1.2x a token's cost: 1.25x plain
        pl3.observe("heads", 1, i % 2, 0.060)
    assert pl3.plan(st, 500)[:2] == ("heads", 1)
    for i in range(40):
        pl3.observe("heads", 1, i % 2, 0.060)
    assert pl3.clock.drafted_since_plain >= 128 and pl3.plan(st, 500)[0] == "plain"
    # a fixed D drafts D every step, capped by the tokens left
    assert DraftPlanner(3, "heads").plan(st, 500)[:2] == ("heads", 3)
    assert DraftPlanner(3, "heads").plan(st, 2)[:2] == ("heads", 1)
    # prompt lookup: a repeated context gives drafts, a fresh one does not
    rep = _FakeState([1, 2, 3, 4, 5, 1, 2, 3])
    kind, proposal, _ = DraftPlanner(3, "prompt-lookup").plan(rep, 500)
    assert kind == "lookup" and proposal.tokens == [4, 5, 1] and proposal.match == 3
    assert DraftPlanner(3, "prompt-lookup").plan(st, 500)[:2] == ("plain", 1)
    with pytest.raises(MTPDError, match="unknown draft source"):
        DraftPlanner(3, "medusa")
    with pytest.raises(MTPDError, match="integer >= 0 or 'auto'"):
        DraftPlanner("many", "heads")


REPEAT_PROMPTS = [
    "Repeat this sentence exactly three times: The quick brown fox jumps over the lazy dog.",
    "Here is a list: apple, banana, cherry, apple, banana, cherry. Continue the pattern for ten more items.",
    "Copy this Python code and add a docstring: def add(a, b):\n    return a + b",
    "Write the numbers from 1 to 30 separated by commas.",
]


def test_smollm_greedy_prompt_lookup_and_auto(smol_chat, smol_refs):
    """Prompt lookup alone, combined with heads, and auto: identical to plain
    greedy decoding on the chat prompts and on prompts that repeat text
    (where lookup drafts are accepted)."""
    model, tok, prompts = smol_chat
    heads = fit_heads(model, [p + r for p, r in zip(prompts[:FIT], smol_refs[:FIT])], num_heads=2)
    settings = [(4, "prompt-lookup", None), (3, "heads+lookup", heads), ("auto", "heads+lookup", heads),
                ("auto", "prompt-lookup", None)]
    for i, (p, ref) in enumerate(zip(prompts, smol_refs)):
        if i % 2 and not FULL_GRID:
            continue  # each setting on 1-2 of the 10 prompts (5 of 20 in the full grid)
        d, src, h = settings[(i // 2) % len(settings)]
        got = spec_tokens(model, p, N_SMOL, h, d, draft=src)
        assert_lossless(model, p, got, ref, TIE_TOLERANCE[mx.float32])
    rep = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
           for t in REPEAT_PROMPTS]
    lookup_accepted = 0
    for i, p in enumerate(rep):
        ref = greedy_tokens(model, p, 32)
        for d, src, h in settings[i % 2 :: 2] + (settings[:1] if i % 2 else []):  # each on 2+ prompts
            stats = SpecStats()
            got = spec_tokens(model, p, 32, h, d, draft=src, stats=stats)
            assert_lossless(model, p, got, ref, TIE_TOLERANCE[mx.float32])
            if src == "prompt-lookup" and d == 4:
                lookup_accepted += sum(stats.accepted)
    assert lookup_accepted >= 20  # the lookup path really drafts and accepts


def test_auto_with_heads_that_accept_nothing_decodes_plainly(smol_chat):
    """Untrained heads: `auto` stops drafting after a few steps and probes rarely."""
    model, _, prompts = smol_chat
    heads = init_heads(model, 1, draft_vocab=8192)
    stats = SpecStats()
    got = spec_tokens(model, prompts[3], 96, heads, "auto", draft="heads", stats=stats)
    assert got == greedy_tokens(model, prompts[3], 96)
    assert stats.sources.get("heads", 0) <= 6, stats.sources
    assert stats.sources.get("plain", 0) >= 10


def test_statistics_are_consistent(smol_chat):
    model, _, prompts = smol_chat
    heads = fit_heads(model, [greedy_tokens(model, p, 20) for p in prompts[:2]], num_heads=1)
    stats = SpecStats()
    toks = spec_tokens(model, prompts[0], 20, heads, 3, stats=stats)
    assert stats.emitted >= len(toks) == 20
    assert stats.forwards == stats.rounds or stats.forwards >= stats.rounds
    assert all(0 <= a <= 1 for a in stats.acceptance_rates)
    car = stats.cumulative_acceptance
    assert all(car[i] >= car[i + 1] for i in range(len(car) - 1))
    ar = stats.acceptance_rates
    for i in range(1, len(car)):
        if stats.reached[i] == stats.accepted[i - 1]:  # no max-token truncation at i
            assert abs(car[i] - car[i - 1] * ar[i]) < 1e-9
    assert abs(stats.mean_accepted_length - (1 + sum(car))) < 1e-9


# --- sampling: the output distribution is exactly the backbone's ------------


def _exact_marginals(model, prompt, transform, steps=3):
    """Marginal distributions of the first `steps` sampled tokens, by enumeration."""
    V = model.args.vocab_size
    P = len(prompt)
    p1 = mx.exp(transform(model(mx.array(prompt)[None])[0, -1]))
    seqs = np.array([[*prompt, a, b] for a in range(V) for b in range(V)])
    logits = model(mx.array(seqs))  # (V*V, P+2, V)
    p2_given = mx.exp(transform(logits[::V, P]))  # (V, V): t2 | t1 (t1 = row)
    p3_given = mx.exp(transform(logits[:, P + 1])).reshape(V, V, V)  # t3 | t1, t2
    m1 = np.array(p1)
    joint12 = m1[:, None] * np.array(p2_given)
    m2 = joint12.sum(0)
    m3 = (joint12[:, :, None] * np.array(p3_given)).sum((0, 1))
    return [m1, m2, m3]


def _chi2_pvalue(counts, probs):
    from scipy.stats import chisquare

    n = counts.sum()
    exp = probs * n
    big = exp >= 5
    obs = np.append(counts[big], counts[~big].sum())
    ex = np.append(exp[big], exp[~big].sum())
    if ex[-1] == 0:
        obs, ex = obs[:-1], ex[:-1]
    ex = ex * obs.sum() / ex.sum()
    return chisquare(obs, ex).pvalue


class FixedCostPlanner(DraftPlanner):
    """`auto` on a device where a draft costs little more than a token (step costs
    seeded, never re-measured): what it chooses then follows from acceptance alone,
    not from this machine's load, so a test of the sampling path is not timing-bound."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.seed(costs={"plain": 1.0, "heads": {d: 1.0 + 0.05 * d for d in range(1, 9)},
                         "lookup": {d: 1.0 + 0.02 * d for d in (2, 4, 8, 16, 32)}})

    def _ema(self, key, value):  # measured times are ignored
        pass


@pytest.mark.parametrize("params,source,num_draft,features,draft_scale", [
    (dict(temp=1.0), "heads", 3, None, None),
    (dict(temp=0.7, top_p=0.9, top_k=8, min_p=0.02), "heads", 3, [0], None),  # fused heads
    (dict(temp=1.0), "prompt-lookup", 3, None, None),
    (dict(temp=0.7, top_p=0.9, top_k=8, min_p=0.02), "heads+lookup", "auto", None, None),
    (dict(temp=1.0), "heads", 3, None, 0.4),  # the heads draft cooler than the backbone samples
])
def test_speculative_sampling_matches_the_backbone_distribution(params, source, num_draft, features, draft_scale):
    """N = 1500 generations of 3 tokens with drafting (D = 3); chi-square of each
    position's marginal against the exact distribution.  Each p-value threshold
    is 1e-3, so a correct implementation fails one of the 6 checks with
    probability below 0.6% over seeds; the seeds here are fixed.  `draft_scale`:
    the heads draw their drafts at that factor on the temperature (q != p's transform)."""
    from mlx_mtpd.engine import make_logprobs_transform

    model, _ = tiny_model("llama", vocab_size=24, seed=5)
    transform = make_logprobs_transform(**params)
    # lookup: the model likely samples 2 after this prompt, then [7, 2] proposes [6, 15], often right
    prompt = [15, 7, 2, 6, 15, 7] if source != "heads" else [3, 7, 11, 5]
    marg = _exact_marginals(model, prompt, transform)
    seqs = [prompt + greedy_tokens(model, prompt, 30)]
    heads = fit_heads(model, seqs, num_heads=2, ridge=1.0, features=features)
    if draft_scale is not None:
        heads.draft_scales[params["temp"]] = draft_scale
        assert heads.draft_temperature(params["temp"]) == pytest.approx(params["temp"] * draft_scale)
    mx.random.seed(1234)
    N, V = 1500, 24
    counts = np.zeros((3, V))
    stats = SpecStats()
    planner = FixedCostPlanner(num_draft, source) if num_draft == "auto" else None
    for _ in range(N):
        toks = spec_tokens(model, prompt, 3, heads, num_draft, stats=stats, draft=source, planner=planner,
                           **params)
        for i, t in enumerate(toks):
            counts[i, t] += 1
    acc = sum(stats.accepted) / max(sum(stats.drafted), 1)
    if source == "heads":
        assert acc > 0.1, acc  # the accept path is exercised, not just rejection
    else:
        assert sum(stats.accepted) > 50 and stats.rounds > 100, stats.sources
        assert source != "prompt-lookup" or stats.sources["lookup"] == stats.rounds
    for i in range(3):
        p = _chi2_pvalue(counts[i], marg[i])
        assert p > 1e-3, (i, p, counts[i], marg[i])


def test_heads_draft_at_the_measured_temperature(tmp_path):
    """A head set's draft temperature (eval.json's `draft_temperature`, read when
    it loads) is the one its sampled drafts are drawn at: the nearest measured
    factor on the generation's temperature; greedy and unmeasured ones draft as
    the backbone samples."""
    from mlx_mtpd.heads import draft_scales
    from mlx_mtpd.engine import make_logprobs_transform

    (tmp_path / "eval.json").write_text(json.dumps({"draft_temperature": {
        "0.7": {"scale": 0.6, "overlap": {"0.6": 0.4}}, "1": {"scale": 0.5}, "0": {"scale": 0.1}}}))
    assert draft_scales(tmp_path) == {0.7: 0.6, 1.0: 0.5}
    (tmp_path / "eval.json").write_text("{not json")
    assert draft_scales(tmp_path) == {} and draft_scales(None) == {}

    model, _ = tiny_model("llama", vocab_size=24, seed=5)
    prompt = [3, 7, 11, 5]
    heads = fit_heads(model, [prompt + greedy_tokens(model, prompt, 30)], num_heads=2, ridge=1.0)
    assert heads.draft_temperature(0.7) == 0.7  # nothing measured
    heads.draft_scales.update({0.7: 0.6, 1.0: 0.5})
    assert [heads.draft_temperature(t) for t in (0.0, 0.5, 0.7, 0.9, 2.0)] == pytest.approx([0.0, 0.3, 0.42, 0.45, 1.0])
    st = DraftState(model, heads, 2)
    logits = mx.random.normal((24,))
    spec_tokens(model, prompt, 6, heads, 2, state=st, temp=1.0)
    assert mx.allclose(st.draft_transform(logits), make_logprobs_transform(0.5)(logits), atol=1e-5)
    spec_tokens(model, prompt, 6, heads, 2, state=st)
    assert st.draft_transform is None


def test_long_lookup_drafts_sample_the_backbone_distribution():
    """Drafts of up to 9 tokens from repeated text (long accepted runs, rejections
    mid-draft, drafts cut by the token budget): the first three tokens against
    the exact marginals, tokens 6 and 10 against plain mlx-lm sampling (two-sample
    chi-square, N = 500 each)."""
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler
    from scipy.stats import chi2_contingency

    from mlx_mtpd.engine import make_logprobs_transform

    model, _ = tiny_model("llama", vocab_size=24, seed=5)
    params = dict(temp=0.4)  # the model repeats token 16 with probability 0.8
    transform = make_logprobs_transform(**params)
    prompt = [16] * 6
    marg = _exact_marginals(model, prompt, transform)
    N, V, T = 500, 24, 10
    spec, plain = np.zeros((T, V)), np.zeros((T, V))
    stats = SpecStats()
    mx.random.seed(7)
    for _ in range(N):
        for i, t in enumerate(spec_tokens(model, prompt, T, None, 9, stats=stats, draft="prompt-lookup", **params)):
            spec[i, t] += 1
        for i, (t, _) in enumerate(generate_step(mx.array(prompt), model, max_tokens=T,
                                                 sampler=make_sampler(**params))):
            plain[i, int(t)] += 1
    assert len(stats.drafted) == 8 and stats.drafted[7] > 200  # 8 drafts (the budget's cap) after the first token
    assert stats.accepted[4] > 70, stats.accepted  # runs of 5+ accepted drafts
    partial = sum(stats.reached[i] - stats.accepted[i] for i in range(1, len(stats.reached)))
    assert partial > 70  # rejections after the first position
    for i in range(3):
        assert _chi2_pvalue(spec[i], marg[i]) > 1e-3, (i, spec[i], marg[i])
    for i in (5, 9):
        keep = (spec[i] + plain[i]) > 0
        p = chi2_contingency(np.stack([spec[i][keep], plain[i][keep]]))[1]
        assert p > 1e-3, (i, p, spec[i], plain[i])


def test_transform_matches_mlx_lm_sampler():
    """Our p is the distribution mlx-lm's own sampler draws from."""
    from mlx_lm.sample_utils import make_sampler

    from mlx_mtpd.engine import make_logprobs_transform

    model, _ = tiny_model("llama", vocab_size=24, seed=5)
    params = dict(temp=0.7, top_p=0.9, top_k=8, min_p=0.02)
    logits = model(mx.array([[3, 7, 11, 5]]))[0, -1]
    p = np.array(mx.exp(make_logprobs_transform(**params)(logits)))
    sampler = make_sampler(**params)
    mx.random.seed(0)
    lp = logits - mx.logsumexp(logits)
    draws = sampler(mx.broadcast_to(lp, (4000, 24)))
    counts = np.bincount(np.array(draws), minlength=24).astype(float)
    assert _chi2_pvalue(counts, p) > 1e-3


# --- bad input ----------------------------------------------------------------


def test_bad_input_errors(smol):
    model, _ = smol
    heads = init_heads(model, 1)
    with pytest.raises(MTPDError, match="prompt is empty"):
        spec_tokens(model, [], 4, heads, 2)
    with pytest.raises(MTPDError, match="--num-draft must be >= 0"):
        spec_tokens(model, [1, 2], 4, heads, -1)
    with pytest.raises(MTPDError, match="needs MTP heads"):
        spec_tokens(model, [1, 2], 4, None, 2)


def test_mismatched_and_missing_heads(tmp_path, smol_path):
    import mlx_lm

    from conftest import write_hf_checkpoint
    from mlx_mtpd.heads import load_heads, save_heads

    src = tmp_path / "tiny"
    write_hf_checkpoint(src, "llama", vocab_size=300)
    tiny, _ = mlx_lm.load(str(src))
    save_heads(init_heads(tiny, 1), tmp_path / "tiny_heads")
    smol_model, _ = mlx_lm.load(str(smol_path))
    with pytest.raises(MTPDError, match="another backbone"):
        load_heads(tmp_path / "tiny_heads", smol_model)
    # same architecture and sizes, other weights: caught by the embedding probe
    other = tmp_path / "tiny2"
    write_hf_checkpoint(other, "llama", vocab_size=300, seed=9)
    tiny2, _ = mlx_lm.load(str(other))
    with pytest.raises(MTPDError, match="embedding differs"):
        load_heads(tmp_path / "tiny_heads", tiny2)

    r = run_cli("generate", "--model", smol_path, "--heads", tmp_path / "tiny_heads", "--prompt", "hi")
    assert r.returncode == 1 and "another backbone" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "empty").mkdir()
    r = run_cli("generate", "--model", smol_path, "--heads", tmp_path / "empty", "--prompt", "hi")
    assert r.returncode == 1 and "holds no head set" in r.stderr
    r = run_cli("generate", "--model", smol_path, "--prompt", "")
    assert r.returncode == 1 and "prompt is empty" in r.stderr
    r = run_cli("generate", "--model", smol_path, "--prompt", "hi", "--num-draft", "-2")
    assert r.returncode == 1 and "--num-draft must be >= 0" in r.stderr


def test_generate_cli_with_heads(tmp_path, smol_path):
    heads = tmp_path / "h"
    r = run_cli("init-heads", "--model", smol_path, "--num-heads", 2, "--out", heads)
    assert r.returncode == 0, r.stderr
    r = run_cli("generate", "--model", smol_path, "--heads", heads, "--max-tokens", 12,
                "--num-draft", 3, "--prompt", "What is the capital of France? Answer in one sentence.")
    assert r.returncode == 0, r.stderr
    assert "The capital of France is Paris." in r.stdout
    assert "Generation:" in r.stdout and "Acceptance: tau" in r.stdout
    r = run_cli("init-heads", "--model", smol_path, "--out", heads)
    assert r.returncode == 1 and "already exists" in r.stderr


def test_stream_generate_mirrors_mlx_lm(smol_chat):
    """Same text pieces, token counts and finish reason as mlx_lm.stream_generate,
    for an answer that ends with EOS and one cut by max_tokens."""
    import mlx_lm

    from mlx_mtpd.generate import stream_generate

    model, tok, prompts = smol_chat
    heads = fit_heads(model, [p + greedy_tokens(model, p, 24) for p in prompts[:3]], num_heads=2)
    paris = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        add_generation_prompt=True)
    for prompt, n in [(paris, 40), (prompts[0], 9)]:
        ref = list(mlx_lm.stream_generate(model, tok, prompt, max_tokens=n))
        got = list(stream_generate(model, tok, prompt, max_tokens=n, heads=heads, num_draft=3))
        assert [r.text for r in got] == [r.text for r in ref]
        assert [r.token for r in got] == [r.token for r in ref]
        assert got[-1].finish_reason == ref[-1].finish_reason
        assert got[-1].generation_tokens == ref[-1].generation_tokens
        assert got[-1].stats.emitted >= got[-1].generation_tokens
    assert ref[-1].finish_reason == "length"


def test_bench_cli_json_and_plot(tmp_path):
    from conftest import write_hf_checkpoint

    model = tmp_path / "m"
    write_hf_checkpoint(model, "llama", vocab_size=300, seed=8)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "the cat"}\n{"messages": [{"role": "user", "content": "an inn"}]}\n')
    r = run_cli("bench", "--model", model, "--heads", "untrained", "--prompts", prompts, "--max-tokens", 12,
                "--num-draft", "0,1,3", "--json", tmp_path / "b.json", "--plot", tmp_path / "b.png")
    assert r.returncode == 0, r.stderr
    res = __import__("json").loads((tmp_path / "b.json").read_text())
    for key in ("plain_tokens_per_s", "mtp_tokens_per_s", "speedup", "mean_accepted_length",
                "acceptance_by_position", "identical_outputs", "num_prompts", "device", "blas"):
        assert key in res
    assert res["num_prompts"] == 2 and set(res["by_num_draft"]) == {"D=0", "D=1", "D=3"}
    assert res["identical_outputs"] is True
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    r = run_cli("bench", "--model", model, "--heads", "untrained", "--prompts", prompts, "--num-draft", "x")
    assert r.returncode == 1 and "--num-draft must be integers" in r.stderr


def test_bench_warm_mode_keeps_one_conversation_per_setting(tmp_path):
    """--mode warm: the turns of one chat.  Greedy, each setting's history is its
    own (identical) answers; sampled, every setting answers the same conversation
    (plain mlx-lm's answers as its history), so the contexts the settings decode
    in are the same length and the ratio is not a matter of whose answers ran longer."""
    from conftest import write_hf_checkpoint

    from mlx_mtpd.bench import bench
    from mlx_mtpd.heads import init_heads
    from mlx_mtpd.utils import load

    write_hf_checkpoint(tmp_path / "m", "llama", vocab_size=300, seed=8)
    model, tok, _ = load(str(tmp_path / "m"))
    heads = init_heads(model, 1)
    prompts = ["the cat", "an inn", "the theme"]
    for temp in (0.0, 0.9):
        res = bench(model, tok, heads, prompts, max_tokens=10, drafts=["auto", 2], temp=temp, mode="warm",
                    progress=False, draft=["heads"])
        rows = res["per_prompt"]
        lengths = [r["prompt_tokens"] for r in rows]
        assert all(len(set(x.values())) == 1 for x in lengths)  # the same prompt for every setting
        assert lengths[2]["plain"] > lengths[1]["plain"] > lengths[0]["plain"]  # the history grows
        if temp == 0:
            assert res["identical_outputs"] is True
