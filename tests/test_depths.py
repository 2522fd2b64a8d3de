"""The head depths' bookkeeping (mlx_mtpd.depths.DepthCaches) on its own: every
entry and tail element carries its position, and a random walk of catch-ups,
verification steps and rewinds checks after each move that depth k holds
exactly positions [0, c_k) in its cache and [c_{k+1}, c_k) in its tail.  The
engine's tests check the same caches against a recomputation with real heads."""

from __future__ import annotations

import numpy as np
import mlx.core as mx

from mlx_mtpd.depths import DepthCaches


def _enc(k: int, lo: int, hi: int) -> mx.array:
    """Depth k's outputs at positions lo..hi-1, as a (hi - lo, 1) array."""
    return (mx.arange(lo, hi, dtype=mx.float32) + 1000 * k)[:, None]


def _compute(dc: DepthCaches, k: int, lo: int, hi: int) -> mx.array:
    """Depth k runs over positions [lo, hi): its cache takes them, its outputs come back."""
    x = _enc(k, lo, hi)
    kv = x.reshape(1, 1, hi - lo, 1)
    dc.caches[k - 1].update_and_fetch(kv, kv)
    return x


def _check(dc: DepthCaches) -> None:
    c = dc.committed
    assert all(c[k] >= c[k + 1] for k in range(1, dc.depth)), c
    for k in range(1, dc.depth + 1):
        cache = dc.caches[k - 1]
        assert cache.offset == c[k], (k, cache.offset, c)
        if c[k]:
            held = np.array(cache.state[0][0, 0, : c[k], 0])
            np.testing.assert_array_equal(held, np.arange(c[k]) + 1000 * k)
        tail = dc.tail[k]
        if k == dc.depth:  # the deepest depth feeds no other
            assert tail is None or tail.shape[0] == 0
        else:
            got = [] if tail is None else np.array(tail[:, 0]).tolist()
            assert got == list(range(c[k + 1] + 1000 * k, c[k] + 1000 * k)), (k, got, c)


def _catch_up(dc: DepthCaches, n: int, depths: int) -> None:
    """What head_drafts.catch_up does to the bookkeeping: depth k reaches n - k + 1."""
    old, new = dc.committed, list(dc.committed)
    hi = n
    for k in range(1, depths + 1):
        hi = min(hi, n - k + 1)
        new[k] = max(old[k], hi)
        hi = new[k]
    streams = [None] * (depths + 1)
    for k in range(1, depths + 1):
        out = _compute(dc, k, old[k], new[k]) if new[k] > old[k] else None
        streams[k] = dc.stream(k, out)
    dc.advance(new, depths, streams)


def _step(dc: DepthCaches, n: int, d: int, a: int) -> None:
    """A verification step from position n drafting d tokens, a accepted: depth k
    runs over [c_k, n) (catch-up and draft positions), then rolls back."""
    streams = [None] * (d + 1)
    for k in range(1, d + 1):
        streams[k] = dc.stream(k, _compute(dc, k, dc.committed[k], n))
    dc.rollback(d, a, n, streams)


def test_depth_bookkeeping_random_walk():
    rng = np.random.default_rng(0)
    for depth in (1, 2, 4):
        dc = DepthCaches(depth)
        n = 5  # the last known token's position
        moves = [0, 0, 0]
        _check(dc)
        for _ in range(200):
            move = rng.integers(3)
            if move == 0:
                _catch_up(dc, n, int(rng.integers(1, depth + 1)))
                moves[0] += 1
            elif move == 1:
                d = int(rng.integers(1, depth + 1))
                if all(dc.committed[k] < n for k in range(1, d + 1)):  # depth k drafts from position n - 1
                    a = int(rng.integers(0, d + 1))
                    _step(dc, n, d, a)
                    n += a + 1
                    moves[1] += 1
            else:
                p = int(rng.integers(1, n + 1))
                dc.rewind(p)
                n = p + int(rng.integers(0, 3))  # the new turn's tokens after the kept prefix
                moves[2] += 1
            _check(dc)
            assert dc.lags(n) == [n - dc.committed[k] for k in range(1, depth + 1)]
            assert all(x >= y for x, y in zip(dc.lags(n)[1:], dc.lags(n)))  # a deeper depth lags as far or further
        assert min(moves) >= 20, moves  # every move made often
        _catch_up(dc, n, depth)
        assert dc.arrays(depth)  # something to evaluate once caught up


def test_rollback_keeps_what_the_accepted_tokens_feed():
    """Depth k's entry at j takes t_{j+k}: after drafting 3 from n = 10 with 1
    accepted, depth k keeps j <= n + a - k, i.e. c_k = min(n, n - k + 1 + a)."""
    dc = DepthCaches(3)
    _catch_up(dc, 10, 3)
    assert dc.committed[1:4] == [10, 9, 8]
    _step(dc, 10, 3, 1)
    assert dc.committed[1:4] == [10, 10, 9]
    _check(dc)
    dc.rewind(12)  # depth k keeps at most p - k: nothing to drop
    assert dc.committed[1:4] == [10, 10, 9]
    # depth 3 keeps 6; depth 2's outputs from 6 on were consumed (its tail started
    # at 9), so it drops back to 6 to recompute them, and depth 1 likewise
    dc.rewind(9)
    assert dc.committed[1:4] == [6, 6, 6]
    _check(dc)


def test_rollback_never_drops_below_where_the_heads_started():
    """Heads that start at position 10 (a prompt they never saw: an adopted prompt
    cache, or a row joining the server's batch) and draft 3 from n = 11, none
    accepted: depth k would keep j <= n - k, below 10 for depth 3, whose cache
    holds nothing before 10; it keeps nothing instead, and the next step (3 drafts
    from n = 12, all accepted) finds every depth's cache and tail in order."""
    dc = DepthCaches(3, base=10)
    _step(dc, 11, 3, 0)
    assert dc.committed[1:4] == [11, 10, 10]
    assert [c.offset for c in dc.caches] == [1, 0, 0]  # c_k - base entries each
    _step(dc, 12, 3, 3)
    assert dc.committed[1:4] == [12, 12, 12]
    for k in (1, 2, 3):
        held = np.array(dc.caches[k - 1].state[0][0, 0, : dc.caches[k - 1].offset, 0])
        np.testing.assert_array_equal(held, np.arange(10, 12) + 1000 * k)
