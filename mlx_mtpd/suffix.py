"""Drafting from what was already said: a suffix index over the context.

Repeats and edits (renamed code, a reformatted list, a quoted passage, JSON
written again) are where a model-free draft is nearly free, long and almost
always right.  :class:`SuffixIndex` keeps, for every pair of adjacent tokens of
a sequence, the positions where that pair ended, updated per appended token
(no rescan of the context per step).  A query finds the longest suffix of the
sequence that occurred before (its length is the *match length*), and
:meth:`SuffixIndex.propose` drafts what followed it: where the suffix occurred
several times, the occurrences vote token by token, the draft keeps the
majority (ties: the most recent occurrence) and stops where fewer than half of
the still-agreeing occurrences agree.  Reading past the end of the sequence
reads the draft itself, so periodic text (a counted list, a repeated line)
drafts as far as the cap.

An :class:`AnswerMemory` is the same index over earlier answers (a chat
session's, or a server's when its operator allows it), queried with the
context's suffix.  The planner (:mod:`mlx_mtpd.planner`) decides how much of
a proposal to verify, from the acceptance it measured for matches of that
length.  See docs/DESIGN.md.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Deque, Dict, Iterable, List, Optional, Sequence, Tuple

ANCHOR = 2  # the shortest match that drafts (a pair of tokens)
MAX_MATCH = 64  # match lengths are counted up to this many tokens
MAX_CANDIDATES = 16  # most recent occurrences of the anchor examined per query
MAX_LOOKUP_DRAFT = 32  # the longest draft a match proposes
SEPARATOR = -1  # between the answers of a memory: no match runs across it


@dataclass
class Proposal:
    """A model-free draft: its tokens and the length of the match it continues."""

    tokens: List[int]
    match: int
    source: str = "context"  # or "memory"

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, key):  # proposal[:m] is a shorter proposal of the same match
        if isinstance(key, slice):
            return Proposal(self.tokens[key], self.match, self.source)
        return self.tokens[key]

    def __iter__(self):
        return iter(self.tokens)


class SuffixIndex:
    """Every adjacent token pair of a sequence, with the end positions of its occurrences."""

    def __init__(self, tokens: Iterable[int] = ()):
        self.tokens: List[int] = []
        self.table: Dict[Tuple[int, int], List[int]] = {}
        self._last: Tuple[int, int, int] = (-1, 0, -1)  # (length, match, end) of the last match query
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, new: Iterable[int]) -> None:
        t, table = self.tokens, self.table
        for x in new:
            x = int(x)
            if t:
                key = (t[-1], x)
                ends = table.get(key)
                if ends is None:
                    table[key] = [len(t) + 1]
                else:
                    ends.append(len(t) + 1)
            t.append(x)

    def truncate(self, n: int) -> None:
        """Keep the first n tokens (a rewound context)."""
        t, table = self.tokens, self.table
        while len(t) > n:
            if len(t) >= 2:
                key = (t[-2], t[-1])
                ends = table[key]
                ends.pop()
                if not ends:
                    del table[key]
            t.pop()
        self._last = (-1, 0, -1)

    def sync(self, tokens: Sequence[int]) -> None:
        """Hold exactly `tokens`: the common prefix stays indexed, the rest is
        indexed anew (once per turn; within a generation use :meth:`extend`)."""
        t = self.tokens
        m = min(len(t), len(tokens))
        p = 0
        while p < m and t[p] == tokens[p]:
            p += 1
        if p < len(t):
            self.truncate(p)
        self.extend(tokens[p:])

    # -- queries ----------------------------------------------------------------
    def candidates(self, query: Sequence[int], exclude_end: Optional[int] = None) -> List[Tuple[int, int]]:
        """(end, match length) of the most recent occurrences in this index of
        `query`'s last pair, each extended backwards against `query`."""
        if len(query) < ANCHOR:
            return []
        ends = self.table.get((query[-2], query[-1]))
        if not ends:
            return []
        t, n = self.tokens, len(query)
        out = []
        for e in reversed(ends[-(MAX_CANDIDATES + 1):]):
            if e == exclude_end:
                continue
            m = ANCHOR
            while m < MAX_MATCH and e - m - 1 >= 0 and m < n and t[e - m - 1] == query[n - m - 1] != SEPARATOR:
                m += 1
            out.append((e, m))
            if len(out) == MAX_CANDIDATES:
                break
        return out

    def match_length(self) -> int:
        """The longest suffix of the sequence that occurred earlier in it (0: none).

        Constant time while a match goes on (the previous match extended by the
        new token), a query of the anchor's occurrences otherwise: cheap enough
        to check after every plainly decoded token."""
        t = self.tokens
        n = len(t)
        length, m, e = self._last
        if length == n - 1 and m and e < n - 1 and t[e] == t[-1]:
            m, e = min(m + 1, MAX_MATCH), e + 1
        elif length != n:
            cands = self.candidates(t, exclude_end=n)
            m, e = max(((mm, ee) for ee, mm in cands), default=(0, -1))
        self._last = (n, m, e)
        return m

    def propose(self, cap: int, query: Optional[Sequence[int]] = None) -> Proposal:
        """Up to `cap` tokens that followed the longest earlier match of the
        suffix of `query` (default: this index's own sequence)."""
        own = query is None
        query = self.tokens if own else query
        if cap <= 0:
            return Proposal([], 0)
        cands = self.candidates(query, exclude_end=len(query) if own else None)
        if not cands:
            return Proposal([], 0)
        best = max(m for _, m in cands)
        live = [e for e, m in cands if m == best]  # most recent first
        t, n = self.tokens, len(self.tokens)
        draft: List[int] = []

        def at(p: int) -> int:
            if p < n:
                return t[p]
            return draft[p - n] if own and p - n < len(draft) else SEPARATOR

        while len(draft) < cap and live:
            j = len(draft)
            votes: Dict[int, int] = {}
            for e in live:
                x = at(e + j)
                if x != SEPARATOR:
                    votes[x] = votes.get(x, 0) + 1
            if not votes:
                break
            tok = max(votes, key=votes.__getitem__)  # the first of equals: the most recent occurrence
            if 2 * votes[tok] < len(live):
                break  # the occurrences disagree here
            draft.append(tok)
            live = [e for e in live if at(e + j) == tok]
        return Proposal(draft, best)


class AnswerMemory:
    """A bounded store of earlier answers, queried with the context's suffix:
    what was said in a conversation that has since been trimmed or reset (a
    chat), or in earlier requests (a server, when allowed)."""

    def __init__(self, max_tokens: int = 32768):
        self.max_tokens = max_tokens
        self.answers: Deque[List[int]] = deque()
        self.index = SuffixIndex()

    def add(self, answer: Sequence[int]) -> None:
        answer = list(answer)[-self.max_tokens:]
        if len(answer) < ANCHOR + 1:
            return
        self.answers.append(answer)
        total = sum(len(a) + 1 for a in self.answers)
        if total > self.max_tokens:
            while total > self.max_tokens:
                total -= len(self.answers.popleft()) + 1
            self.index = SuffixIndex()  # rebuilt from what is kept (rare: once per max_tokens)
            for a in self.answers:
                self.index.extend(a + [SEPARATOR])
        else:
            self.index.extend(answer + [SEPARATOR])

    def propose(self, cap: int, context: Sequence[int]) -> Proposal:
        p = self.index.propose(cap, query=context)
        p.source = "memory"
        return p


def propose(index: SuffixIndex, cap: int, memory: Optional[AnswerMemory] = None) -> Proposal:
    """The context's own proposal, or the memory's when it matches longer."""
    p = index.propose(cap)
    if memory is not None and memory.answers:
        q = memory.propose(cap, index.tokens)
        if q.tokens and q.match > p.match:
            return q
    return p


def prompt_lookup(tokens: List[int], num_draft: int) -> List[int]:
    """The draft the index proposes for `tokens` (built from scratch: for tests
    and one-off callers; the engine keeps one index per conversation)."""
    return SuffixIndex(tokens).propose(num_draft).tokens
