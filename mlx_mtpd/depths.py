"""The head depths' caches and their bookkeeping (docs/DESIGN.md, "Drafting
with cascaded heads").

Depth k (1..D) runs head k over positions j, taking the previous depth's
output at j (the backbone's hidden state for depth 1) and the token t_{j+k}.
Its KV cache holds the entries of positions [0, c_k): `committed[k]` = c_k,
always with c_1 >= c_2 >= ... >= c_D (a deeper depth needs the one above it
first). The outputs of depth k that depth k+1 has not yet taken, positions
[c_{k+1}, c_k), are kept as its `tail` (the deepest depth keeps none). Every
change of these numbers goes through this class: catching up (`advance`),
a verified step (`rollback`), a new turn that keeps part of the context
(`rewind`).
"""

from __future__ import annotations

from typing import List, Optional

import mlx.core as mx
from mlx_lm.models.cache import KVCache


class DepthCaches:
    def __init__(self, depth: int, base: int = 0):
        self.depth = depth
        self.caches = [KVCache() for _ in range(depth)]
        # c[k] for k = 1..D (c[0] and c[D+1] unused, kept 0).  `base`: positions
        # before it were never seen by the heads (a prompt cache's unknown
        # prefix); depth k's cache holds c_k - base entries.
        self.base = base
        self.committed = [0] + [base] * depth + [0]
        self.tail: List[Optional[mx.array]] = [None] * (depth + 1)  # k = 1..D (0 unused: the backbone's are kept apart)

    def tail_start(self, k: int, committed: Optional[List[int]] = None) -> int:
        """First position of depth k's tail: the next depth's committed count
        (depth 0, the backbone's stream, starts at depth 1's; the deepest keeps none)."""
        c = self.committed if committed is None else committed
        if k == 0:
            return c[1]
        return c[k + 1] if k < self.depth else c[k]

    def lags(self, length: int) -> List[int]:
        """How far each depth 1..D lags the backbone's `length`: the positions a
        step drafting with it first catches up (a depth's first use: the whole
        context)."""
        return [length - c for c in self.committed[1 : self.depth + 1]]

    def arrays(self, depths: int) -> List[mx.array]:
        """Everything depths 1..`depths` hold: what to evaluate after catching up."""
        out = [x for c in self.caches[:depths] if c.keys is not None for x in c.state]
        return out + [t for t in self.tail if t is not None]

    def advance(self, new: List[int], depths: int, streams: List[Optional[mx.array]]) -> None:
        """Depths 1..`depths` computed positions [c_k, new[k]); `streams[k]` is
        depth k's outputs from its old tail start (`stream`): each tail becomes
        what the next depth has yet to take."""
        old = self.committed
        for k in range(1, depths + 1):
            stream = streams[k]
            if k < self.depth:
                keep_from = (new[k + 1] if k < depths else old[k + 1]) - self.tail_start(k, old)
                self.tail[k] = None if stream is None else stream[keep_from:]
            else:
                self.tail[k] = None
        self.committed = list(new)

    def stream(self, k: int, out: Optional[mx.array]) -> Optional[mx.array]:
        """Depth k's outputs from its tail start: the tail, then `out`."""
        tail = self.tail[k]
        if out is None:
            return tail
        return out if tail is None or tail.shape[0] == 0 else mx.concatenate([tail, out], axis=0)

    def rollback(self, d: int, a: int, n: int, streams: List[Optional[mx.array]]) -> None:
        """After a step that drafted d tokens from position n, a of them accepted:
        depth k keeps its entries whose input token t_{j+k} was accepted
        (j <= n + a - k), and none before `base` (it never had any: a step drafted
        right after the heads started); `streams[k]` are depth k's outputs from its
        old tail start."""
        old = list(self.committed)
        new = list(old)
        for k in range(1, d + 1):
            new[k] = max(self.base, min(n, n - k + 1 + a))
            self.caches[k - 1].trim(n - new[k])
        self.committed = new
        for k in range(1, d + 1):
            lo = self.tail_start(k, new) - self.tail_start(k, old)
            hi = new[k] - self.tail_start(k, old)
            self.tail[k] = streams[k][lo:hi]

    def rewind(self, p: int) -> None:
        """The context keeps its first p positions: every depth drops what lies
        beyond (depth k holds at most p - k); where the next depth now needs
        outputs older than a depth's tail, that depth drops back to them too and
        recomputes them on its next catch-up."""
        old = list(self.committed)
        new = list(old)
        for k in range(1, self.depth + 1):
            new[k] = max(self.base, min(old[k], p - k))
        for k in range(self.depth - 1, 0, -1):
            if new[k + 1] < self.tail_start(k, old):
                new[k] = new[k + 1]
        for k in range(1, self.depth + 1):
            self.caches[k - 1].trim(old[k] - new[k])
            if k < self.depth and self.tail[k] is not None:
                o = self.tail_start(k, old)
                self.tail[k] = self.tail[k][self.tail_start(k, new) - o : new[k] - o]
        self.committed = new
