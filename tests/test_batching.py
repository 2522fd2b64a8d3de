"""Drafting inside the server's running batch (mlx_mtpd.batching): rows of different
draft lengths verified in one forward, each row's rejections rolled back on its own;
greedy output equal to the plain batch's and to each request decoded alone, sampled
output distributed as the backbone's."""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
import pytest

from conftest import greedy_tokens, tiny_model
from heads_util import fit_heads
from mlx_mtpd.batching import Batch, BatchDrafter


class Job:
    def __init__(self):
        self.cancelled = threading.Event()
        self.prompt, self.i = None, None


class Sink:
    def __init__(self):
        self.text = ""

    def add(self, piece, final=False):
        self.text += piece
        return False


class Detok:
    def __init__(self):
        self.tokens = []

    def add_token(self, t):
        self.tokens.append(int(t))

    def finalize(self):
        pass

    @property
    def last_segment(self):
        return ""


class TokenTokenizer:
    """What the batch needs of a tokenizer, keeping each row's token ids."""

    eos_token_ids = [10_000]  # never produced: rows end at max_tokens

    @property
    def detokenizer(self):
        return Detok()


def free_verification(drafter: BatchDrafter):
    """Every verification costs one plain step: a row drafts whenever its text proposes."""
    drafter._cost = lambda b, n, head_rows=0, depth=0: 1.0


def decode(model, prompts, max_tokens, draft, temp=0.0, force=None, oracle=None, max_batch=8, seed=0, heads=None,
           lookup=True):
    """Each prompt's tokens from one batch; the drafter's step counts.  `force`: these
    drafts at every step; `oracle`: each prompt's true continuation, drafted with
    random lengths (0-6) and, one time in three, a wrong token somewhere (so rows
    accept different prefixes, some all of it, some none).  `heads`: rows without a
    proposal draft with these (every step they can: drafting is free)."""
    batch = Batch(model, TokenTokenizer(), max_batch=max_batch, draft=draft, heads=heads, lookup=lookup)
    rng = np.random.default_rng(seed)
    if draft:
        free_verification(batch.drafter)
        if heads is not None:
            batch.drafter.worth_a_look = lambda uids: True
        if force is not None or oracle is not None:
            batch.drafter.worth_a_look = lambda uids: True

            def plan(uids, ys):
                if force is not None:
                    return [list(force) for _ in uids]
                out = []
                for uid, y in zip(uids, ys):
                    job = batch.rows[uid].job
                    pos = len(batch.drafter.rows[uid]["index"]) - len(job.prompt)
                    ref = oracle[job.i]
                    assert ref[pos] == y
                    d = list(ref[pos + 1: pos + 1 + int(rng.integers(0, 7))])
                    if d and rng.random() < 1 / 3:
                        d[int(rng.integers(0, len(d)))] = int(rng.integers(0, 100))
                    out.append(d)
                return out if any(out) else None

            batch.drafter.plan = plan
    rows = []
    for i, p in enumerate(prompts):
        job = Job()
        job.prompt, job.i = p, i
        n = max_tokens[i] if isinstance(max_tokens, list) else max_tokens
        rows.append(batch.add(job, Sink(), p, n, {"temp": temp}))
    while len(batch):
        batch.step(lambda row, reason: None)
    return [r.detokenizer.tokens for r in rows], (batch.drafter.steps if draft else None)


# repeats, so the rows' own text proposes drafts (of different lengths, at different steps)
PROMPTS = [
    [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6],
    [20, 21, 22, 23, 24, 25, 26, 20, 21, 22],
    [40, 41, 42, 43],
    [11, 12, 13, 11, 12, 13, 11, 12, 13, 11, 12, 13, 11],
    [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 60, 61],
]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
def test_batch_drafting_greedy_equals_plain_batch_and_alone(arch):
    """Drafts of the true continuation, of random lengths, some with a wrong token:
    every row's output equals the plain batch's and its decoding alone."""
    model, _ = tiny_model(arch, vocab_size=128, seed=3)
    alone = [greedy_tokens(model, p, 40) for p in PROMPTS]
    plain, _ = decode(model, PROMPTS, 40, draft=False)
    drafted, steps = decode(model, PROMPTS, 40, draft=True, oracle=alone)
    assert steps["lookup"] >= 5, steps  # the rows drafted, and often
    assert plain == alone
    assert drafted == alone


def test_batch_drafting_rows_join_and_finish_mid_draft():
    """Three rows at a time, six requests of different lengths: rows that end inside
    an accepted draft (max_tokens) leave with exactly their tokens, and the rows
    that take their places go on from the rolled-back batch caches."""
    model, _ = tiny_model("llama", vocab_size=128, seed=4)
    prompts = PROMPTS + PROMPTS[:1]
    lengths = [7, 33, 12, 25, 40, 9]
    alone = [greedy_tokens(model, p, 40) for p in prompts]
    tokens, steps = decode(model, prompts, lengths, draft=True, oracle=alone, max_batch=3, seed=1)
    assert steps["lookup"] >= 5
    assert tokens == [ref[:n] for ref, n in zip(alone, lengths)]


def test_batch_drafting_samples_the_backbone_distribution():
    """T = 1 with forced two-token drafts at every step (accepted and rejected):
    N = 1200 answers of 3 tokens (150 batches of 8 rows); each position's marginal
    matches the enumerated one (chi-square)."""
    from test_engine import _exact_marginals

    model, _ = tiny_model("llama", vocab_size=24, seed=5)
    prompt = [3, 9, 4, 17, 3, 9]
    marg = _exact_marginals(model, prompt, lambda x: x - mx.logsumexp(x, axis=-1, keepdims=True))
    force = [int(np.argmax(marg[1])), int(np.argmax(marg[2]))]  # often right, often wrong
    _sampled_marginals_match(model, prompt, marg, "lookup", force=force)


def _sampled_marginals_match(model, prompt, marg, source, **kw):
    """150 batches of 8 rows answering `prompt` with 3 tokens at T = 1 (`kw`: how
    they draft), every batch drafting from `source`: each position's marginal
    against the enumerated one `marg` (chi-square)."""
    from test_engine import _chi2_pvalue

    counts = [np.zeros(len(marg[0])) for _ in range(3)]
    mx.random.seed(11)
    for _ in range(150):
        outs, steps = decode(model, [prompt] * 8, 3, draft=True, temp=1.0, **kw)
        assert steps[source] >= 1, steps
        for toks in outs:
            for i, t in enumerate(toks):
                counts[i][t] += 1
    for i in range(3):
        assert counts[i].sum() == 1200
        assert _chi2_pvalue(counts[i], marg[i]) > 1e-3, (i, counts[i], marg[i])


def _fitted_heads(model, prompts, n=40):
    """Heads fitted to the model's own greedy continuations (they accept often, not always)."""
    return fit_heads(model, [p + greedy_tokens(model, p, n) for p in prompts], num_heads=1, ridge=1.0)


@pytest.mark.parametrize("arch,lookup", [("llama", False), ("qwen3", True)])
def test_batch_head_drafts_equal_each_request_alone(arch, lookup):
    """Rows drafting with the heads inside the batch (three rows at a time, five
    requests of different lengths joining and leaving, depths 1-3 looped from one
    head; with lookup, rows whose text repeats draft from it instead): greedy
    answers equal each request decoded alone, and the heads' drafts were accepted
    (and rejected)."""
    model, _ = tiny_model(arch, vocab_size=128, seed=4)
    heads = _fitted_heads(model, PROMPTS)
    lengths = [7, 33, 12, 25, 40]
    alone = [greedy_tokens(model, p, 40) for p in PROMPTS]
    batch = Batch(model, TokenTokenizer(), max_batch=3, draft=True, heads=heads, lookup=lookup)
    free_verification(batch.drafter)
    batch.drafter.worth_a_look = lambda uids: True
    rows, ended = [], []
    for i, p in enumerate(PROMPTS):
        rows.append(batch.add(Job(), Sink(), p, lengths[i], {"temp": 0.0}))
    while len(batch):
        batch.step(lambda row, reason: ended.append(row))
    assert [r.detokenizer.tokens for r in rows] == [ref[:n] for ref, n in zip(alone, lengths)]
    steps = batch.drafter.steps
    assert steps["heads"] >= 20, steps
    assert not lookup or any(r.extra.get("lookup", {}).get("accepted") for r in ended), [r.extra for r in ended]
    counts = batch.drafter.head_acceptance[0.0].counts["heads"]  # [accepted, reached] by position, decayed
    assert len(counts) == 3 and all(r > 0 for _, r in counts), counts  # every depth drafted
    assert 0 < counts[0][0] < counts[0][1] and counts[1][0] > 0, counts
    heads_rows = [r.extra["heads"] for r in ended if "heads" in r.extra]
    assert len(heads_rows) >= 3 and all(0 < x["accepted"] < x["drafted"] for x in heads_rows), heads_rows


def test_batch_rows_heads_see_their_prompts():
    """The batch's prefill hands each row's hidden states to its heads: after the
    first step a row's heads hold every position of its prompt (from 0, or from
    the end of a kept conversation's prefix), equal to the backbone's own."""
    from mlx_mtpd.batching import keep, kept_caches
    from mlx_mtpd.heads import Backbone
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = tiny_model("llama", vocab_size=128, seed=4)
    heads = _fitted_heads(model, PROMPTS[:2])
    kept = kept_caches()
    prefix = PROMPTS[1][:5]
    cache = make_prompt_cache(model)
    model(mx.array([prefix]), cache=cache)
    keep(kept, prefix, cache)
    batch = Batch(model, TokenTokenizer(), max_batch=3, draft=True, heads=heads, cache=kept)
    for p in PROMPTS[:2]:
        batch.add(Job(), Sink(), p, 4, {"temp": 0.0})
    batch.step(lambda row, reason: None)
    backbone = Backbone(model)
    for uid, p, base in zip(list(batch.drafter.rows), PROMPTS[:2], (0, len(prefix))):
        own = batch.drafter.rows[uid]["own"]
        assert own.hist_base == base and own.length >= len(p), (own.hist_base, own.length, len(p))
        _, ref = backbone.forward_batch(mx.array([p]))
        assert mx.allclose(own.hidden_range(base, len(p)), ref[0, base:], atol=1e-4)


def test_rows_drafted_together_draft_as_each_alone():
    """head_drafts.draft_rows (the batch's rows drafted with one output projection
    per depth) gives each sequence what `draft` gives it alone: the same drafts,
    q and depth outputs, and the same depth caches after."""
    from test_engine import spec_tokens

    from mlx_mtpd import head_drafts
    from mlx_mtpd.engine import DraftState, make_logprobs_transform

    model, _ = tiny_model("llama", vocab_size=128, seed=4)
    heads = _fitted_heads(model, PROMPTS)

    def states():  # each prompt decoded a few tokens with the heads: depths caught up to different points
        out = []
        for i, p in enumerate(PROMPTS[:3]):
            st = DraftState(model, heads, 3)
            spec_tokens(model, p, 5 + 3 * i, heads, 1 + i, state=st)
            out.append(st)
        return out

    for transform in (None, make_logprobs_transform(0.8)):
        alone, together = states(), states()
        mx.random.seed(3)
        one = [head_drafts.draft(st, 3, transform) for st in alone]
        both = head_drafts.draft_rows(together, 3, [transform] * 3)
        assert transform is not None or len({tuple(int(x) for x in t) for t, *_ in one}) > 1  # rows of their own
        for (t1, q1, s1, _), (t2, q2, s2, _), a, b in zip(one, both, alone, together):
            # sampled drafts are drawn in another order: depth 1's q and output are compared
            deep = 4 if transform is None else 2
            if transform is None:
                assert [int(x) for x in t1] == [int(x) for x in t2]
            else:
                assert mx.allclose(q1[0], q2[0], atol=1e-5)
            assert all(mx.allclose(x, y, atol=1e-4) for x, y in zip(s1[1:deep], s2[1:deep]))
            assert [c.offset for c in a.depths.caches] == [c.offset for c in b.depths.caches]


def test_drop_tails_equals_mlx_lms_right_padding():
    """batching.drop_tails (trim what every row drops, move a row that drops more)
    leaves each row's cache as mlx-lm's prepare(right_padding) + finalize does:
    the same kept entries at the same columns, offsets and left padding."""
    from mlx_lm.models.cache import BatchKVCache

    from mlx_mtpd.batching import drop_tails

    for drop in ([0, 0, 0], [2, 2, 2], [0, 3, 1], [4, 1, 4], [0, 0, 5]):
        caches = []
        for _ in range(2):  # two caches with the same entries
            rng = np.random.default_rng(sum(drop))
            c = BatchKVCache([3, 0, 5])
            for n in (9, 6):  # two updates (the second like a verification of 6 tokens a row)
                k = mx.array(rng.standard_normal((3, 2, n, 4)).astype(np.float32))
                c.update_and_fetch(k, k * 2)
            caches.append(c)
        ours, theirs = caches
        drop_tails([ours], drop)
        theirs.prepare(right_padding=drop)
        theirs.finalize()
        assert ours._idx <= theirs._idx and ours.offset.tolist() == theirs.offset.tolist()
        cut = theirs._idx - ours._idx  # mlx-lm keeps every column; the trimmed ones are padding there
        assert (ours.left_padding + cut).tolist() == theirs.left_padding.tolist()
        for i in range(3):
            lo = int(ours.left_padding[i])
            for a, b in zip(ours.keys_and_values(), theirs.keys_and_values()):
                assert mx.array_equal(a[i, :, lo:], b[i, :, lo + cut:]), (drop, i)


def test_batch_head_drafts_sample_the_backbone_distribution():
    """T = 1, the heads drafting (cooler than the backbone: the head set's draft
    temperature 0.5 x T) at every step they can: N = 1200 answers of 3 tokens
    (150 batches of 8 rows); each position's marginal matches the enumerated one
    (chi-square)."""
    from test_engine import _exact_marginals

    model, _ = tiny_model("llama", vocab_size=24, seed=5)
    prompt = [3, 9, 4, 17, 3, 9]
    marg = _exact_marginals(model, prompt, lambda x: x - mx.logsumexp(x, axis=-1, keepdims=True))
    heads = _fitted_heads(model, [prompt], 30)
    heads.draft_scales[1.0] = 0.5
    _sampled_marginals_match(model, prompt, marg, "heads", heads=heads, lookup=False)


def test_planner_drafts_only_when_it_pays():
    """The batch planner weighs the drafts' expected tokens against a verification's
    cost at this batch size: no proposal, or a costly verification, decodes plainly."""
    d = BatchDrafter()
    d.add(1, [5, 6, 7, 8, 5, 6, 7], {"temp": 0.0})
    d.add(2, [1, 2, 3, 4], {"temp": 0.0})
    assert d.plan([2], [9]) is None  # nothing to propose
    d.plain_cost[2] = 0.1
    for n in range(2, 10):  # verifying n tokens a row costs little more than a plain step
        d.draft_cost[(2, n)] = 0.1 + 0.002 * n
    drafts = d.plan([1, 2], [8, 9])
    assert drafts is not None and drafts[1] == [] and drafts[0]
    assert drafts[0] == [5, 6, 7, 8, 5, 6, 7, 8][:len(drafts[0])]
    for n in range(2, 10):  # ... or several plain steps: plain decoding
        d.draft_cost[(2, n)] = 0.1 * n
    assert d.plan([1, 2], [8, 9]) is None


def test_planner_prices_unmeasured_batch_sizes_from_the_nearest_measured():
    """A verification not yet measured at this batch size is priced by the prior's
    line scaled to what verifications cost at the nearest size measured."""
    d = BatchDrafter()
    d.plain_cost.update({4: 0.1, 8: 0.12})
    assert d._cost(8, 3) == pytest.approx(0.12 * (1 + 2 * (0.1 + 0.025 * 8)))  # nothing measured: the prior
    d.draft_cost[(4, 2)] = 0.13  # an extra token a row costs 0.3 plain steps at 4 rows, the prior said 0.2
    assert d._cost(8, 3) == pytest.approx(0.12 * (1 + 2 * 0.3 * 1.5))
    assert d._cost(4, 2) == pytest.approx(0.13)  # measured: as measured


def test_planner_prices_the_rows_head_drafts():
    """A row with heads and no proposal from its text drafts with them when their
    expected tokens beat a plain step at the verification's cost plus the head's
    own (per drafting row, measured); a costly head decodes plainly."""
    model, _ = tiny_model("llama", vocab_size=128, seed=4)
    heads = _fitted_heads(model, PROMPTS[:2])
    d = BatchDrafter(model=model, head_set=heads, lookup=False)
    for uid in (1, 2):
        d.add(uid, [1, 2, 3, 4], {"temp": 0.0})
    assert not d.worth_a_look([1, 2]) or d.plan([1, 2], [5, 6]) is None  # no hidden state yet: nothing to draft
    d.row_heads(1, [1, 2, 3, 4]).kept([5], mx.zeros((1, model.args.hidden_size)))
    d.plain_cost[2] = 0.1
    for n in range(2, 5):
        d.draft_cost[(2, n)] = 0.1 + 0.001 * n
    d.head_cost = 0.001
    drafts = d.plan([1, 2], [6, 7])
    assert d.worth_a_look([1, 2]) and drafts is not None
    assert isinstance(drafts[0], int) and 1 <= drafts[0] <= 3 and drafts[1] == []  # row 2's heads have no state
    d.head_cost = 0.2  # two plain steps of this batch for one row's draft at one depth
    assert not d.worth_a_look([1, 2]) and d.plan([1, 2], [6, 7]) is None
    # measured: a step of 2 rows verifying 3 tokens a row, 0.03 s of it the one drafting row's 2 depths
    d.observed_draft(2, 3, 0.13, [(1, "heads", 2, 1, 0), (2, "lookup", 0, 0, 0)], head_seconds=0.03)
    assert d.head_cost == pytest.approx(0.8 * 0.2 + 0.2 * 0.015) and d.draft_cost[(2, 3)] < 0.103
    # rows drafting together read each depth's projection once: two rows cost less than twice one
    assert 0 < d.head_shared < 1
    assert d._cost(2, 3, 2, 2) - d._cost(2, 3) == pytest.approx(2 * d.head_cost * (2 - d.head_shared))
    assert d.rows[1]["heads"] == [1, 2, 1] and d.steps["heads"] == 1
    # a step whose depths first caught up on many positions (after plain steps) is not a typical cost
    d.observed_draft(2, 3, 0.9, [(1, "heads", 2, 1, 0), (2, "lookup", 0, 0, 0)], head_seconds=0.8, typical=False)
    assert d.head_cost == pytest.approx(0.8 * 0.2 + 0.2 * 0.015) and d.rows[1]["heads"] == [2, 4, 2]


EDIT_REQUESTS = [
    "Repeat the following paragraph exactly: Our store opens at nine in the morning and closes at six "
    "in the evening. On Saturdays we open at ten. We are closed on Sundays and public holidays.",
    "Here is my code:\ndef add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n"
    "Rewrite it with type hints.",
    "Copy the list: apples, oranges, pears, bananas, grapes, cherries, plums, peaches, mangoes.",
    "What is the capital of France?",
]


def test_smollm_batch_drafts_from_each_conversation(smol):
    """The default model, four requests in one batch, drafting from their own text
    (the batch planner's own choice, on verification costs made free so that it
    drafts wherever the text proposes): the answers equal the plain batch's and
    each request decoded alone by mlx-lm; the rows that repeat their prompt accept
    long drafts."""
    model, tok = smol
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
               for q in EDIT_REQUESTS]
    alone = [greedy_tokens(model, p, 48) for p in prompts]
    plain, _ = decode(model, prompts, 48, draft=False)
    batch = Batch(model, TokenTokenizer(), max_batch=8, draft=True)
    free_verification(batch.drafter)
    rows = [batch.add(Job(), Sink(), p, 48, {"temp": 0.0}) for p in prompts]
    ended = []
    while len(batch):
        batch.step(lambda row, reason: ended.append(row))
    drafted = [r.detokenizer.tokens for r in rows]
    assert plain == alone
    assert drafted == alone
    accepted = {id(r): r.extra.get("lookup", {}).get("accepted", 0) for r in ended}
    assert sum(accepted[id(r)] for r in rows[:3]) >= 30, [r.extra for r in rows]


def test_smollm_batch_drafts_with_the_shipped_heads(smol):
    """The default model and its shipped head set, four chat requests in one batch,
    each row drafting with its heads wherever it can (verification made free, no
    lookup): the answers equal each request decoded alone by mlx-lm, and the heads'
    drafts were accepted in every row."""
    from mlx_mtpd.heads import load_heads
    from mlx_mtpd.utils import DEFAULT_HEADS

    model, tok = smol
    heads = load_heads(DEFAULT_HEADS, model)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
               for q in EDIT_REQUESTS]
    alone = [greedy_tokens(model, p, 32) for p in prompts]
    batch = Batch(model, TokenTokenizer(), max_batch=8, draft=True, heads=heads, lookup=False)
    free_verification(batch.drafter)
    batch.drafter.worth_a_look = lambda uids: True
    rows = [batch.add(Job(), Sink(), p, 32, {"temp": 0.0}) for p in prompts]
    ended = []
    while len(batch):
        batch.step(lambda row, reason: ended.append(row))
    assert [r.detokenizer.tokens for r in rows] == alone
    assert batch.drafter.steps["heads"] >= 8, batch.drafter.steps
    assert all(r.extra.get("heads", {}).get("accepted", 0) >= 2 for r in ended), [r.extra for r in ended]
