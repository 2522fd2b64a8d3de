"""Tree drafts (mlx_mtpd.tree): the tree forward against each path's own
forward on every architecture, the kept path's cache, greedy equality and the
sampled distribution over trees, the planner's choice of a shape."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from conftest import greedy_tokens, tiny_model
from heads_util import fit_heads
from mlx_mtpd.engine import TIE_TOLERANCE, DraftPlanner, DraftState, SpecStats, mtp_generate_step
from mlx_mtpd.errors import MTPDError
from mlx_mtpd.tree import (Tree, Widths, greedy_outcome, keep_path, parse_tree, tree_attention, tree_size,
                            tree_support, walk, widths_for)
from test_engine import _chi2_pvalue, _exact_marginals, assert_lossless

ARCHS = ["llama", "qwen2", "qwen3", "gemma3_text", "phi3", "mimo"]


def _path(t: Tree, node: int):
    out = []
    while node >= 0:
        out.append(node)
        node = t.parent[node]
    return out[::-1]


@pytest.mark.parametrize("shape", [(3, 2, 2), Widths((2, 2, 1), 2)])  # both within gemma's window of 16
@pytest.mark.parametrize("quant", [None, 4])
@pytest.mark.parametrize("arch", ARCHS)
def test_tree_forward_equals_each_paths_forward(arch, quant, shape):
    """Every node's logits in one tree forward equal the logits of a plain
    forward over the prompt and that node's path; keeping a path with an
    alternative on it leaves the cache as the plain forward over that path."""
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = tiny_model(arch, vocab_size=300, seed=3)
    if quant:
        nn.quantize(model, group_size=32, bits=quant)
    prompt = [5, 17, 42, 8, 99, 3, 250]
    t = Tree.caterpillar(3, shape)
    assert t.size == tree_size(shape)
    rng = np.random.default_rng(0)
    nodes = rng.integers(3, 300, size=t.size).tolist()
    cache = make_prompt_cache(model)
    assert tree_support(model, cache) is None
    model(mx.array(prompt)[None], cache=cache)
    with tree_attention(model, cache, t):
        logits = model(mx.array(nodes)[None], cache=cache)[0]
    tol = 1e-4 if quant is None else 2e-3
    for node in range(t.size):
        path = _path(t, node)
        ref = model(mx.array(prompt + [nodes[i] for i in path])[None])[0, -1]
        assert mx.abs(logits[node] - ref).max().item() < tol, (arch, node)
    # keep t_n, c_1 and depth 2's alternative: the cache now holds that path
    alt = t.alt_nodes[1][0]
    keep_path(cache, len(prompt), t.size, [0, 1, alt])
    nxt = model(mx.array([7])[None], cache=cache)[0, -1]
    ref = model(mx.array(prompt + [nodes[0], nodes[1], nodes[alt], 7])[None])[0, -1]
    assert mx.abs(nxt - ref).max().item() < tol
    assert cache[0].offset == len(prompt) + 4
    if t.branch_nodes:  # a whole branch below depth 1's alternative: its path's cache
        cache = make_prompt_cache(model)
        model(mx.array(prompt)[None], cache=cache)
        with tree_attention(model, cache, t):
            model(mx.array(nodes)[None], cache=cache)
        branch = t.branch_nodes[-1]
        keep = [0, t.alt_nodes[0][-1]] + branch
        keep_path(cache, len(prompt), t.size, keep)
        nxt = model(mx.array([7])[None], cache=cache)[0, -1]
        ref = model(mx.array(prompt + [nodes[i] for i in keep] + [7])[None])[0, -1]
        assert mx.abs(nxt - ref).max().item() < tol


def test_walk_follows_branches_below_alternatives():
    """The accepted path from the root: the chain while it holds, then an
    alternative and the branch below it; where no child is accepted the
    fallback (at a leaf the bonus) ends the step."""
    t = Tree.caterpillar(3, Widths((3, 2, 1), 2))
    # nodes: 0 root, 1-3 chain, 4-5 depth 1's alternatives, 6 depth 2's, 7-8 and 9-10 the branches
    assert t.alt_nodes == [[4, 5], [6], []] and t.branch_nodes == [[7, 8], [9, 10]]
    assert t.parent[7] == 4 and t.parent[8] == 7 and t.parent[9] == 5 and t.depth[10] == 3
    tokens = list(range(100, 100 + t.size))
    target = [0] * t.size
    target[0] = tokens[5]  # the root's argmax is the second alternative
    target[5] = tokens[9]  # ... then its branch, to the end
    target[9] = tokens[10]
    target[10] = 42  # the bonus token at the branch's leaf
    out, path, a_chain, rank = walk(t, tokens, *greedy_outcome(t, tokens, target))
    assert (out, path, a_chain, rank) == ([105, 109, 110, 42], [0, 5, 9, 10], 0, 3)
    target = [0] * t.size
    target[0], target[1] = tokens[1], tokens[6]  # c_1, then depth 2's alternative (a leaf)
    target[6] = 7
    out, path, a_chain, rank = walk(t, tokens, *greedy_outcome(t, tokens, target))
    assert (out, path, a_chain, rank) == ([101, 106, 7], [0, 1, 6], 1, 2)
    target = [0] * t.size
    target[0], target[4] = tokens[4], 55  # the first alternative, its branch rejected at once
    out, path, a_chain, rank = walk(t, tokens, *greedy_outcome(t, tokens, target))
    assert (out, path, a_chain, rank) == ([104, 55], [0, 4], 0, 2)


def test_tree_support_names_what_cannot_take_a_tree():
    from mlx_lm.models.cache import ArraysCache, KVCache

    model, _ = tiny_model("llama", vocab_size=300)
    assert "ArraysCache" in tree_support(model, [ArraysCache(2), KVCache()])
    assert "rope" in tree_support(model, [KVCache()] * 5)


def test_parse_tree_and_widths():
    assert parse_tree("auto") == "auto" and parse_tree(None) is None
    assert parse_tree("off") is None and parse_tree("1") is None
    assert parse_tree("3") == (3,) and parse_tree("4,2") == (4, 2)
    assert parse_tree("4,1/2") == (4, 1) and parse_tree("4,1/2").fork == 2
    for bad in ("x", "5", "0,2", "2,,2", "1,2/1", "4/x", "4/-1"):
        with pytest.raises(MTPDError, match="--tree"):
            parse_tree(bad)
    assert widths_for((3,), 2) == (3, 3)
    assert widths_for((4, 2), 3) == (4, 2, 1)
    assert widths_for((1,), 3) is None and widths_for("auto", 2) is None
    # a fork reaches no deeper than the chain, and the tree keeps within MAX_TREE_SIZE nodes
    assert widths_for(parse_tree("4,1,1/2"), 3).fork == 2 and widths_for(parse_tree("4/3"), 2).fork == 1
    assert widths_for(parse_tree("4/2"), 1) == (4,) and not getattr(widths_for(parse_tree("4/2"), 1), "fork", 0)
    big = widths_for(parse_tree("4,2,1,1/3"), 4)  # 18 nodes with the whole fork
    assert tree_size(big) == 15 and big.fork == 2, (big, tree_size(big))


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_architectures_greedy_with_trees(arch):
    """Greedy equality with fixed trees and under auto (where the planner picks
    shapes after it has measured costs), alternatives accepted mid-tree, drafts
    cut by the token budget."""
    model, _ = tiny_model(arch, vocab_size=300, seed=1)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, 300, size=int(rng.integers(4, 12))).tolist() for _ in range(6)]
    refs = [greedy_tokens(model, p, 20) for p in prompts]
    # heads fitted loosely (high ridge): wrong often enough that alternatives matter
    heads = fit_heads(model, [p + r for p, r in zip(prompts[:4], refs[:4])], num_heads=2, ridge=3.0)
    hits = steps = branched = 0
    for p, ref in zip(prompts, refs):
        for d, tree in [(1, (4,)), (2, (3, 2)), (3, (2, 2, 4)), (3, Widths((3, 1, 1), 2)), (2, Widths((4, 2), 1))]:
            stats = SpecStats()
            got = [t for t, _, _ in mtp_generate_step(mx.array(p), model, heads, num_draft=d, tree=tree,
                                                      max_tokens=20, stats=stats)]
            assert_lossless(model, p, got, ref, TIE_TOLERANCE[mx.float32])
            hits += stats.tree_hits
            steps += stats.tree_steps
            branched += stats.branch_accepted
        for n in (2, 3, 5):  # the budget ends inside a tree
            for tree in ((3, 3, 3), Widths((3, 1, 1), 2)):
                got = [t for t, _, _ in mtp_generate_step(mx.array(p), model, heads, num_draft=3, tree=tree,
                                                          max_tokens=n)]
                assert_lossless(model, p, got, ref[:n], TIE_TOLERANCE[mx.float32])
    assert steps > 0 and hits > 0, (steps, hits)
    # a branch below an alternative accepted (gemma's window of 16 leaves room for few trees)
    assert branched > 0 or arch == "gemma3_text", branched


def test_smollm_greedy_with_trees(smol):
    """The real model with the shipped head: fixed trees of several shapes and
    auto with a seeded planner, identical to plain decoding (or a near-tie)."""
    from mlx_mtpd.heads import load_heads
    from mlx_mtpd.utils import DEFAULT_HEADS

    model, tok = smol
    heads = load_heads(DEFAULT_HEADS, model)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
               for q in ("Write a haiku about autumn leaves.", "Give me three tips for learning Python.",
                         "What causes rain?")]
    hits = 0
    for i, p in enumerate(prompts):
        ref = greedy_tokens(model, p, 24)
        for d, tree in [(1, (4,)), (2, (3, 2)), (3, (2, 2, 2))][i:] + [(3, Widths((4, 1, 1), 2)), (2, "auto")]:
            stats = SpecStats()
            planner = None
            if tree == "auto":
                planner = DraftPlanner("auto", "heads", tree="auto")
                planner.seed(costs={"plain": 0.1, "heads": {1: 0.11, 2: 0.12, 3: 0.13},
                                    "lookup": {2: 0.101, 8: 0.107}})
            got = [t for t, _, _ in mtp_generate_step(mx.array(p), model, heads, num_draft=d, tree=tree,
                                                      planner=planner, max_tokens=24, stats=stats)]
            assert_lossless(model, p, got, ref, TIE_TOLERANCE[mx.float32])
            hits += stats.tree_hits
            if tree == "auto":
                assert stats.tree_steps > 0, stats.as_dict()
    assert hits > 0


@pytest.mark.parametrize("params,tree,max_tokens", [
    (dict(temp=1.0), (3, 3, 2), 3),
    (dict(temp=0.7, top_p=0.9, top_k=8, min_p=0.02), (4, 2, 2), 3),
    (dict(temp=1.0), Widths((4, 1, 1), 2), 5),  # D = 3 from the first step: branches of 2 below the alternatives
])
def test_tree_sampling_matches_the_backbone_distribution(params, tree, max_tokens):
    """N = 1500 generations drafted as trees (the first step after the prompt's
    token drafts min(3, max_tokens - 2) tokens): chi-square of the first three
    positions' marginals against the exact distribution (threshold 1e-3), with
    chains rejected, alternatives accepted often, and tokens accepted in the
    branches below them."""
    from mlx_mtpd.engine import make_logprobs_transform

    model, _ = tiny_model("llama", vocab_size=24, seed=5)
    transform = make_logprobs_transform(**params)
    prompt = [3, 7, 11, 5]
    marg = _exact_marginals(model, prompt, transform)
    heads = fit_heads(model, [prompt + greedy_tokens(model, prompt, 30)], num_heads=2, ridge=3.0)
    mx.random.seed(4321)
    N, V = 1500, 24
    counts = np.zeros((3, V))
    stats = SpecStats()
    for _ in range(N):
        toks = [t for t, _, _ in mtp_generate_step(mx.array(prompt), model, heads, num_draft=3, tree=tree,
                                                   max_tokens=max_tokens, stats=stats, **params)]
        for i, t in enumerate(toks[:3]):
            counts[i, t] += 1
    assert stats.tree_steps > 0.9 * N and stats.tree_hits > 100, stats.as_dict()
    if getattr(tree, "fork", 0):
        assert stats.branch_accepted > 50, stats.as_dict()
    for i in range(3):
        assert _chi2_pvalue(counts[i], marg[i]) > 1e-3, (i, counts[i], marg[i])


def test_sampled_branch_below_an_alternative_follows_the_backbone():
    """The acceptance rule alone, where every trial can go down a branch: the
    root's sampled draft c ~ q, its alternative (the best other token by q),
    and below the alternative a draft b ~ q_b(alternative).  The first two
    emitted tokens must be distributed as the backbone's p(x) p(y | x),
    whichever way each trial went (chi-square over the 36 pairs)."""
    from mlx_mtpd.tree import accept_tree_sampled

    rng = np.random.default_rng(3)
    V, N = 6, 6000
    p0 = rng.dirichlet(np.ones(V))
    p1 = rng.dirichlet(np.ones(V), size=V)  # p(y | x)
    q0 = rng.dirichlet(np.ones(V))  # the heads: unlike the backbone
    qb = rng.dirichlet(np.ones(V) * 0.5, size=V)  # the branch's q given the alternative
    t = Tree.caterpillar(1, Widths((2,), 1))  # root -> [c, alt]; alt -> [b]
    assert t.children == [[1, 2], [], [3], []]
    mx.random.seed(11)
    counts = np.zeros((V, V))
    went_down = 0
    for _ in range(N):
        c = int(rng.choice(V, p=q0))
        alt = int(np.argmax(np.where(np.arange(V) == c, -1.0, q0)))
        b = int(rng.choice(V, p=qb[alt]))
        tokens = mx.array([0, c, alt, b], mx.uint32)
        logp = mx.log(mx.array(np.stack([p0, p1[c], p1[alt], np.full(V, 1.0 / V)]), mx.float32))
        first_q = mx.array(np.stack([q0, qb[alt]]), mx.float32)
        outs = accept_tree_sampled(t, tokens, first_q, logp)
        mx.eval(*outs)
        out, path, _, _ = walk(t, [0, c, alt, b], *(x.tolist() for x in outs))
        went_down += path[:3] == [0, 2, 3]
        if len(out) == 1:  # the root's fallback ended the step: the next step samples p(y | x)
            out.append(int(rng.choice(V, p=p1[out[0]])))
        counts[out[0], out[1]] += 1
    assert went_down > 300, went_down
    assert _chi2_pvalue(counts.reshape(-1), (p0[:, None] * p1).reshape(-1)) > 1e-3


def test_fork_drafts_equal_each_branch_drafted_alone():
    """head_drafts.fork_drafts (the branches below depth 1's alternatives, all
    through each depth at once) gives each branch what the head depth gives
    that alternative alone, on a copy of its cache without the chain's entry at
    the draft position (the same q at every depth, sampled, and the same greedy
    drafts); the depth caches the chain uses are left as they were."""
    from mlx_lm.models.cache import KVCache
    from test_engine import spec_tokens

    from mlx_mtpd import head_drafts
    from mlx_mtpd.engine import make_logprobs_transform

    model, _ = tiny_model("llama", vocab_size=128, seed=4)
    prompt = [5, 17, 42, 8, 99, 3, 25, 61]
    heads = fit_heads(model, [prompt + greedy_tokens(model, prompt, 30)], num_heads=2, ridge=3.0)
    for i, head in enumerate(heads.heads):  # fit_heads leaves attention out: put it back, at random
        head.block.self_attn.o_proj.weight = 0.5 * mx.random.normal(head.block.self_attn.o_proj.weight.shape,
                                                                    key=mx.random.key(i))
    for transform in (None, make_logprobs_transform(1.0)):
        st = DraftState(model, heads, 3)
        spec_tokens(model, prompt, 9, heads, 2, state=st)
        _, _, streams, alts = head_drafts.draft(st, 3, transform, (4, 1, 1))
        offsets = [c.offset for c in st.depths.caches]
        tokens, qs = head_drafts.fork_drafts(st, alts[0], 2, streams, transform)
        assert len(tokens) == 2 and tokens[0].shape == (3,) and len(qs) == (0 if transform is None else 2)
        assert [c.offset for c in st.depths.caches] == offsets
        for j in range(3):
            hid, tok = streams[1][-1:], alts[0][j : j + 1]
            for k in (2, 3):
                real = st.depths.caches[k - 1]
                alone = KVCache()
                alone.keys = real.keys[..., : real.offset - 1, :]
                alone.values = real.values[..., : real.offset - 1, :]
                alone.offset = real.offset - 1
                head = st.heads[k - 1]
                out = head(hid, st.backbone.embed_tokens(tok), alone)
                out = head.norm(out) if st.feedback_post else out
                logits = st.project(out[-1:] if st.feedback_post else head.norm(out[-1:]))[0]
                got = int(tokens[k - 2][j])
                if transform is None:
                    choice = mx.argmax(logits)
                    assert got == int(st.draft_ids[choice] if st.draft_ids is not None else choice), (j, k)
                else:
                    q = mx.exp(transform(logits))
                    if st.draft_ids is not None:
                        q = mx.zeros((model.args.vocab_size,)).at[st.draft_ids].add(q)
                    assert mx.allclose(q, qs[k - 2][j], atol=1e-5), (j, k)
                hid, tok = out, mx.array([got], mx.uint32)


def test_planner_grows_a_tree_only_where_it_pays():
    st = type("S", (), {"max_depth": 3, "can_verify": lambda self, d: True, "tree_reason": None,
                        "index": None})()
    cheap = DraftPlanner("auto", "heads", tree="auto").seed(
        acceptance=[0.4, 0.4, 0.4], costs={"plain": 0.1, "heads": {1: 0.105, 2: 0.11, 3: 0.115},
                                           "lookup": {2: 0.1, 8: 0.106}})
    kind, d, _ = cheap.plan(st, 100)
    assert kind == "heads" and cheap.widths is not None and sum(cheap.widths) > d, (d, cheap.widths)
    dear = DraftPlanner("auto", "heads", tree="auto").seed(
        acceptance=[0.4, 0.4, 0.4], costs={"plain": 0.1, "heads": {1: 0.105, 2: 0.11, 3: 0.115},
                                           "lookup": {2: 0.1, 8: 0.2}})
    kind, d, _ = dear.plan(st, 100)
    assert kind == "heads" and dear.widths is None
    # alternatives that never hit: the shape shrinks back to a chain
    for _ in range(60):
        cheap.observe("heads", 1, 0, None)
        cheap.observe_tree(1, (4,), 0, 0, 0.12)
    cheap.plan(st, 100)
    assert cheap.widths is None or sum(w - 1 for w in cheap.widths) < 2
    table = cheap.rank_table(1)
    assert table[0][0] < 0.1
    chain = DraftPlanner("auto", "heads", tree=None).seed(costs={"plain": 0.1, "heads": {1: 0.105},
                                                                 "lookup": {2: 0.1, 8: 0.106}})
    chain.plan(st, 100)
    assert chain.widths is None


def test_planner_forks_where_branches_pay():
    """Under auto, a fork below depth 1's alternatives where verifying more
    tokens costs next to nothing (a GPU) and alternatives are often right; none
    where each verified token costs (this CPU); and the fork shortens once its
    branches are seen to accept nothing."""
    from mlx_mtpd.tree import fork_of

    st = type("S", (), {"max_depth": 3, "can_verify": lambda self, d: True, "tree_reason": None,
                        "index": None})()
    costs = {"plain": 0.1, "heads": {1: 0.101, 2: 0.102, 3: 0.103}, "lookup": {2: 0.1, 8: 0.1005}}
    ranks = [[0.5, 0.4, 0.3]] * 3
    sizes = (3, 4, 5, 6, 8, 10, 12, 16)
    free = DraftPlanner("auto", "heads", tree="auto").seed(
        acceptance=[0.6, 0.6, 0.6], ranks=ranks, costs={**costs, "tree": {n: 0.104 for n in sizes}})
    kind, d, _ = free.plan(st, 100)
    before = free.widths
    assert kind == "heads" and fork_of(before) >= 2, (d, before)
    dear = DraftPlanner("auto", "heads", tree="auto").seed(
        acceptance=[0.6, 0.6, 0.6], ranks=ranks, costs={**costs, "tree": {n: 0.1 + 0.02 * n for n in sizes}})
    dear.plan(st, 100)
    assert not fork_of(dear.widths), dear.widths
    for _ in range(200):  # branches that never accept: the alternative, then nothing below it
        free.observe_tree(3, before, 0, 2, None, accepted=1)
    free.plan(st, 100)
    assert fork_of(free.widths) < fork_of(before), (before, free.widths, free.fork_counts)


def test_tree_state_reports_chains_for_recurrent_models():
    """A model whose caches cannot keep one branch drafts chains (and says why)."""
    from mlx_lm.models.cache import ArraysCache

    model, _ = tiny_model("llama", vocab_size=300)
    heads = fit_heads(model, [list(range(3, 40))], num_heads=1)
    st = DraftState(model, heads, 2)
    assert st.tree_reason is None
    st.cache = [ArraysCache(2)] + st.cache[1:]
    assert tree_support(model, st.cache) is not None
