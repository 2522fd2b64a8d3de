"""The suffix index (drafting from what was already said) and the match-aware
planner, without a model: incremental updates against brute force, proposals,
the answer memory, per-bucket acceptance and the cost of long drafts."""

from __future__ import annotations

import random

import pytest

from mlx_mtpd.planner import ALWAYS_TRY_MATCH, DraftPlanner, match_bucket
from mlx_mtpd.suffix import MAX_MATCH, AnswerMemory, SuffixIndex, prompt_lookup, propose


def brute_match(t):
    """The longest suffix of t (capped at MAX_MATCH) that also ends earlier in t."""
    n = len(t)
    best = 0
    for e in range(2, n):
        m = 0
        while m < min(MAX_MATCH, e) and t[e - 1 - m] == t[n - 1 - m]:
            m += 1
        best = max(best, m)
    return best if best >= 2 else 0


def test_prompt_lookup_takes_the_latest_longest_match():
    assert prompt_lookup([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 3) == [7, 5, 1]
    assert prompt_lookup([5, 1, 2, 9, 4, 1, 2, 8, 6, 1, 2], 2) == [8, 6]  # most recent of equals
    assert prompt_lookup([4, 1, 2, 9, 6, 6, 1, 2, 8, 4, 1, 2], 2) == [9, 6]  # the longer match [4 1 2] wins
    assert prompt_lookup([1, 2, 3, 4], 3) == []
    assert prompt_lookup([1, 2, 1, 2], 0) == []
    # periodic text reads the draft itself past the end: a counted list drafts to the cap
    assert prompt_lookup([1, 2, 1, 2], 5) == [1, 2, 1, 2, 1]
    assert prompt_lookup([7, 3, 4, 5, 3, 4, 5, 3, 4], 7) == [5, 3, 4, 5, 3, 4, 5]


def test_occurrences_vote_and_stop_where_they_disagree():
    # the suffix [1 2] occurred three times: continuations 5 6 7 / 5 6 8 / 5 9
    t = [1, 2, 5, 6, 7, 0, 1, 2, 5, 6, 8, 0, 1, 2, 5, 9, 0, 4, 1, 2]
    p = SuffixIndex(t).propose(10)
    assert p.match == 2
    # 5 (3 of 3), 6 (2 of 3), then 7 vs 8 is one against one: the most recent (8) goes on
    assert p.tokens[:3] == [5, 6, 8]
    # a longer match than the others decides alone
    t2 = [9, 1, 2, 5, 6, 7, 1, 2, 3, 3, 9, 1, 2]
    assert SuffixIndex(t2).propose(3).tokens == [5, 6, 7]
    # two equally long matches that disagree at once: one against one, the most recent goes on
    t3 = [1, 2, 5, 0, 1, 2, 6, 0, 1, 2, 7, 0, 1, 2]
    assert SuffixIndex(t3).propose(4).tokens == [7, 0, 1, 2]
    # three occurrences, three different continuations: no majority, no draft
    assert SuffixIndex([1, 2, 5, 1, 2, 6, 1, 2, 7, 1, 2]).propose(4).tokens == []


def test_index_updates_incrementally_like_a_rebuild():
    """Random appends, truncations (rewinds) and syncs (a new turn's prompt):
    the index, its match length and its proposal equal a rebuild's and brute force."""
    rng = random.Random(0)
    idx = SuffixIndex()
    seq = []
    for _ in range(400):
        r = rng.random()
        if r < 0.7:
            new = [rng.randrange(5) for _ in range(rng.randrange(1, 4))]
            if rng.random() < 0.3 and len(seq) > 10:  # a copy of an earlier passage
                s = rng.randrange(len(seq) - 5)
                new = seq[s : s + rng.randrange(3, 12)]
            seq += new
            idx.extend(new)
        elif r < 0.85:
            n = rng.randrange(len(seq) + 1)
            seq = seq[:n]
            idx.truncate(n)
        else:
            seq = seq[: rng.randrange(len(seq) + 1)] + [rng.randrange(5) for _ in range(3)]
            idx.sync(seq)
        assert idx.tokens == seq
        fresh = SuffixIndex(seq)
        assert {k: v for k, v in idx.table.items()} == fresh.table
        assert idx.match_length() == brute_match(seq) == fresh.match_length(), seq
        assert idx.propose(8).tokens == fresh.propose(8).tokens


def test_match_length_follows_a_repeat_in_constant_time():
    text = list(range(100, 160))
    idx = SuffixIndex(text + [1, 2])
    lengths, queries = [], []
    real = idx.candidates
    idx.candidates = lambda *a, **k: queries.append(1) or real(*a, **k)
    for tok in text[:40]:
        idx.extend([tok])
        lengths.append(idx.match_length())
    assert lengths == [0] + list(range(2, 41))  # one token is no match
    assert len(queries) == 2  # then each token extends the match without a query


def test_answer_memory_drafts_earlier_answers_and_stays_bounded():
    mem = AnswerMemory(max_tokens=50)
    mem.add([10, 11, 12, 13, 14, 15, 16])
    mem.add([20, 21, 22, 23])
    ctx = SuffixIndex([1, 2, 3, 11, 12])
    p = propose(ctx, 4, mem)
    assert p.source == "memory" and p.tokens == [13, 14, 15, 16]  # never across the separator
    assert propose(SuffixIndex([5, 6]), 4, mem).tokens == []
    # the context's own match wins when it is as long
    ctx2 = SuffixIndex([11, 12, 99, 11, 12])
    assert propose(ctx2, 2, mem).tokens == [99, 11] and propose(ctx2, 2, mem).source == "context"
    for i in range(20):
        mem.add(list(range(100 + 10 * i, 108 + 10 * i)))
    assert sum(len(a) + 1 for a in mem.answers) <= 50
    assert len(mem.index) == sum(len(a) + 1 for a in mem.answers)
    assert propose(SuffixIndex([3, 10, 11]), 3, mem).tokens == []  # the oldest answer was dropped


def test_match_buckets():
    assert [match_bucket(m) for m in (2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64)] == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


class _State:
    def __init__(self, tokens, max_depth=0):
        self.index, self.max_depth, self.memory = SuffixIndex(tokens), max_depth, None

    @property
    def tokens(self):
        return self.index.tokens

    def can_verify(self, d):
        return True


def _timed(planner, t0=0.1):
    planner.observe_plain(8, 8 * t0 * 3)  # warm-up, not timed
    planner.observe_plain(8, 8 * t0)


def test_planner_long_match_is_drafted_whatever_short_matches_did():
    """Short matches that never pay do not hide a long repeat (per-bucket
    acceptance), and a long match is verified even after misses of its own."""
    pl = DraftPlanner("auto", "prompt-lookup")
    _timed(pl)
    for _ in range(30):  # 2-token matches: always wrong
        pl.observe("lookup", 4, 0, 0.11, match=2)
    short = _State([5, 6, 7, 1, 2, 9, 9, 1, 2])
    assert pl.plan(short, 500)[0] == "plain"
    text = list(range(100, 140))
    repeat = _State(text + [0] + text[:20])  # a 20-token match of a 40-token passage
    kind, prop, _ = pl.plan(repeat, 500)
    assert kind == "lookup" and prop.match == 20 and len(prop) >= 6
    assert prop.tokens == text[20 : 20 + len(prop)]
    # history of long matches that failed: still tried, but short
    for _ in range(10):
        pl.observe("lookup", len(prop), 0, 0.12, match=20)
    kind, prop2, _ = pl.plan(repeat, 500)
    assert kind == "lookup" and 1 <= len(prop2) < len(prop)
    # long matches that pay: the longest drafts, up to the cap of 32
    pl2 = DraftPlanner("auto", "prompt-lookup")
    _timed(pl2)
    for d in (8, 16, 32):
        for _ in range(4):
            pl2.observe("lookup", d, d, 0.1 + 0.004 * d, match=40)
    big = _State(list(range(100, 180)) + [0] + list(range(100, 140)))
    kind, prop3, _ = pl2.plan(big, 500)
    assert kind == "lookup" and len(prop3) == 32
    assert pl2.plan(big, 10)[1].tokens == list(range(140, 149))  # capped by the tokens left


def test_planner_plain_burst_ends_at_a_useful_match():
    pl = DraftPlanner("auto", "heads+lookup")
    st = _State(list(range(50)), max_depth=1)
    assert pl.plan(st, 500)[0] == "plain" and pl.stop_match is None  # not timed yet: no early stop
    _timed(pl)
    for _ in range(10):  # heads that accept nothing
        pl.observe("heads", 1, 0, 0.12)
    assert pl.plan(st, 500)[0] == "plain"
    assert 2 <= pl.stop_match <= ALWAYS_TRY_MATCH
    for _ in range(40):  # short matches that never pay: the burst waits for a longer one
        pl.observe("lookup", 3, 0, 0.13, match=2)
        pl.observe("lookup", 3, 0, 0.13, match=3)
    pl.plan(st, 500)
    assert pl.stop_match >= 5
    # heads-only planners never stop a burst for a match
    ph = DraftPlanner("auto", "heads")
    _timed(ph)
    ph.plan(st, 500)
    assert ph.stop_match is None


def test_planner_prices_long_drafts_from_measured_lengths():
    pl = DraftPlanner("auto", "prompt-lookup")
    _timed(pl, t0=0.1)
    assert pl.step_cost("lookup", 16) == pytest.approx(0.1 * (1 + 0.08 * 16))  # prior
    pl.observe("lookup", 4, 4, 0.13, match=20)
    pl.observe("lookup", 16, 16, 0.19, match=20)
    assert pl.step_cost("lookup", 10) == pytest.approx(0.16)  # interpolated
    assert pl.step_cost("lookup", 2) == pytest.approx(0.115)  # from one plain token at d = 0
    assert pl.step_cost("lookup", 32) == pytest.approx(0.19 + 0.008 * 16)  # the prior slope beyond
    pl.observe("lookup", 8, 8, 0.12, match=20)  # a noisy shorter step: never cheaper than a shorter one
    assert pl.step_cost("lookup", 8) == pytest.approx(0.13)
    # while a repeat drafts far better than plain, plain decoding is not re-timed
    rep = _State(list(range(100, 180)) + [0] + list(range(100, 130)))
    for _ in range(20):
        pl.observe("lookup", 16, 16, 0.17, match=30)
    assert pl.clock.drafted_since_plain >= pl.probe_every
    assert pl.plan(rep, 500)[0] == "lookup"


def test_planner_probes_the_heads_again_while_lookup_steps_pay():
    """One unlucky head step must not shut the heads out for good: lookup steps
    that pay (short matches in ordinary text) postpone the generic probe, so
    the heads are re-measured every probe_every tokens whatever drafted
    meanwhile; a long repeat that pays by far is not interrupted for it."""
    pl = DraftPlanner("auto", "heads+lookup")
    _timed(pl)
    pl.observe("heads", 1, 0, 0.11)  # the heads' first step accepts nothing: they no longer pay
    st = _State([5, 6, 7, 1, 2, 9, 4, 3, 1, 2], max_depth=1)  # a 2-token match
    for i in range(6):
        pl.observe("lookup", 2, i % 2, 0.11, match=2)  # short matches that pay a little (1.36x)
    kinds, emitted = [], 0
    for i in range(200):
        kind, arg, _ = pl.plan(st, 500)
        kinds.append(kind)
        if kind == "heads":
            break
        if kind == "lookup":
            pl.observe("lookup", len(arg), min(i % 2, len(arg)), 0.11, match=arg.match)
            emitted += min(i % 2, len(arg)) + 1
        else:
            pl.observe_plain(arg, arg * 0.1)
            emitted += arg
    assert "lookup" in kinds and kinds[-1] == "heads", kinds
    assert emitted >= pl.probe_every - 6  # not before it is due
    # while a repeat drafts far better than plain, the probe waits
    pl.observe("heads", 1, 0, 0.11)
    rep = _State(list(range(100, 180)) + [0] + list(range(100, 130)), max_depth=1)
    for _ in range(20):
        pl.observe("lookup", 16, 16, 0.15, match=30)
    assert pl.clock.heads_since >= pl.probe_every and pl.plan(rep, 500)[0] == "lookup"
