"""The lossless speculative decoding loop with cascaded MTP heads.

Depth k is a stream over positions with its own KV cache.  Its entry at
position j takes (h^{k-1}_j, t_{j+k}) where h^0 is the backbone's hidden
state.  After the backbone has emitted t_0..t_n (its cache holding
t_0..t_{n-1}), each step:

1. for k = 1..D, one call of depth k's block over positions c_k..n-1: the
   positions whose inputs became known since the last step (catch-up, true
   tokens) followed by the draft positions (tokens drafted by depths < k); the
   last output predicts the draft d_{n+k};
2. one backbone forward over [t_n, d_{n+1}, ..., d_{n+D}] verifies all drafts;
3. accept (greedy: while the draft equals the argmax; sampling: with
   probability min(1, p/q), residual resampling on rejection, a bonus token
   when all are accepted);
4. roll back: the backbone cache drops the rejected drafts, depth k keeps the
   entries whose input token was accepted.

Steps 1-3 are one lazy MLX graph evaluated once per step; drafts reach the next
depth without a host round-trip.  See ../shared/docs/METHOD.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Generator, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import trim_prompt_cache

from .errors import MTPDError
from .heads import Backbone, HeadSet

# Greedy speculative output may differ from plain decoding only where the
# backbone's top-two logits are closer than this (float32; see METHOD.md's
# numerical note): verifying several tokens at once changes matmul shapes.
TIE_TOLERANCE = {mx.float32: 1e-3, mx.float16: 0.15, mx.bfloat16: 0.25}


@dataclass
class SpecStats:
    """Acceptance statistics of one generation, defined as vLLM and llama.cpp do."""

    num_draft: int = 0
    emitted: int = 0
    forwards: int = 0  # backbone forwards after the prompt (verification steps)
    rounds: int = 0  # steps that drafted at least one token
    drafted: List[int] = field(default_factory=list)  # per draft position
    reached: List[int] = field(default_factory=list)  # drafted with all earlier ones accepted
    accepted: List[int] = field(default_factory=list)
    step_time: float = 0.0  # seconds in draft + verify + rollback steps
    fallback: Optional[str] = None  # why drafting stopped early, if it did

    def record(self, num_draft: int, accepted: int) -> None:
        if len(self.drafted) < num_draft:
            grow = num_draft - len(self.drafted)
            for lst in (self.drafted, self.reached, self.accepted):
                lst.extend([0] * grow)
        self.forwards += 1
        self.emitted += accepted + 1
        if num_draft == 0:
            return
        self.rounds += 1
        for i in range(num_draft):
            self.drafted[i] += 1
            if i <= accepted:
                self.reached[i] += 1
            if i < accepted:
                self.accepted[i] += 1

    def add(self, other: "SpecStats") -> "SpecStats":
        """Accumulate another generation's counts into this one."""
        n = max(len(self.drafted), len(other.drafted))
        for name in ("drafted", "reached", "accepted"):
            a, b = getattr(self, name), getattr(other, name)
            setattr(self, name, [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)])
        self.rounds += other.rounds
        self.forwards += other.forwards
        self.emitted += other.emitted
        self.step_time += other.step_time
        self.num_draft = other.num_draft
        return self

    @property
    def acceptance_rates(self) -> List[float]:
        """AR_k: acceptance at position k given positions < k were accepted."""
        return [a / r if r else 0.0 for a, r in zip(self.accepted, self.reached)]

    @property
    def cumulative_acceptance(self) -> List[float]:
        """CAR_k: accepted at position k per drafting round."""
        return [a / self.rounds if self.rounds else 0.0 for a in self.accepted]

    @property
    def mean_accepted_length(self) -> float:
        """tau: tokens per drafting round, 1 + accepted / rounds."""
        return 1.0 + sum(self.accepted) / self.rounds if self.rounds else 1.0

    def as_dict(self) -> dict:
        return {
            "num_draft": self.num_draft,
            "emitted": self.emitted,
            "backbone_forwards": self.forwards,
            "rounds": self.rounds,
            "drafted": list(self.drafted),
            "accepted": list(self.accepted),
            "acceptance_rates": self.acceptance_rates,
            "cumulative_acceptance": self.cumulative_acceptance,
            "mean_accepted_length": self.mean_accepted_length,
            "fallback": self.fallback,
        }


def make_logprobs_transform(
    temp: float = 0.0, top_p: float = 0.0, top_k: int = 0, min_p: float = 0.0, min_tokens_to_keep: int = 1
) -> Optional[Callable[[mx.array], mx.array]]:
    """The distribution mlx-lm's `make_sampler` samples from, as normalized log-probs.

    None for greedy.  The same transform applies to the heads' logits (q) and
    the backbone's (p), as speculative sampling requires.
    """
    if temp < 0:
        raise MTPDError(f"--temp must be >= 0 (got {temp})")
    if not 0 <= top_p <= 1:
        raise MTPDError(f"--top-p must be in [0, 1] (got {top_p})")
    if not 0 <= min_p <= 1:
        raise MTPDError(f"--min-p must be in [0, 1] (got {min_p})")
    if top_k < 0:
        raise MTPDError(f"--top-k must be >= 0 (got {top_k})")
    if temp == 0:
        return None
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    def transform(logits: mx.array) -> mx.array:
        lp = logits.astype(mx.float32)
        lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
        if 0 < top_p < 1.0:
            lp = apply_top_p(lp, top_p)
        if min_p != 0.0:
            lp = apply_min_p(lp, min_p, min_tokens_to_keep)
        if 0 < top_k < lp.shape[-1]:
            lp = apply_top_k(lp, top_k)
        lp = lp * (1 / temp)
        return lp - mx.logsumexp(lp, axis=-1, keepdims=True)

    return transform


def accept_greedy(drafts: mx.array, logits: mx.array):
    """Accepted count and the backbone's token at every position (lazy)."""
    target = mx.argmax(logits, axis=-1)
    n = drafts.shape[0]
    if n == 0:
        return mx.array(0), target
    ok = (drafts == target[:n]).astype(mx.int32)
    return mx.cumprod(ok).sum(), target


def accept_sampled(drafts: mx.array, draft_q: mx.array, logp: mx.array):
    """Speculative sampling: accept d_i with probability min(1, p_i(d_i)/q_i(d_i));
    at the first rejection sample from norm(max(0, p_i - q_i)); after D
    acceptances sample the bonus token from p_D.  Returns (accepted count,
    the token to emit after each possible prefix) lazily.

    drafts: (D,), draft_q: (D, V) draft distributions, logp: (D+1, V) log p.
    """
    n = drafts.shape[0]
    p = mx.exp(logp)
    bonus = mx.random.categorical(logp[n:])
    if n == 0:
        return mx.array(0), bonus
    idx = mx.arange(n)
    p_d = p[idx, drafts]
    q_d = draft_q[idx, drafts]
    u = mx.random.uniform(shape=(n,))
    ok = (u * q_d < p_d).astype(mx.int32)
    residual = mx.maximum(p[:n] - draft_q, 0.0)
    mass = residual.sum(axis=-1, keepdims=True)
    # p == q leaves no residual mass: then a rejection cannot happen (u < 1).
    residual = mx.where(mass > 0, residual, p[:n])
    fix = mx.random.categorical(mx.log(residual))
    return mx.cumprod(ok).sum(), mx.concatenate([fix, bonus])


class DraftState:
    """Every cache the loop keeps: the backbone's, one per depth, and the
    recent hidden outputs each depth has not yet handed to the next."""

    def __init__(self, model: nn.Module, head_set: Optional[HeadSet], max_depth: int, loop: str):
        from mlx_lm.models.cache import KVCache, make_prompt_cache

        self.model = model
        self.cache = make_prompt_cache(model)
        self.max_depth = max_depth if head_set is not None else 0
        self.backbone = Backbone(model) if self.max_depth else None
        self.heads = [head_set.head_for_depth(d, loop) for d in range(1, self.max_depth + 1)]
        self.depth_cache = [KVCache() for _ in range(self.max_depth)]
        self.committed = [0] * (self.max_depth + 2)  # c[k] for k = 1..D (c[0] unused)
        self.tail: List[Optional[mx.array]] = [None] * (self.max_depth + 1)  # k = 0..D
        self.tokens: List[int] = []
        if self.max_depth:
            self.project = self.backbone.projection_rows(head_set.draft_ids)
            self.draft_ids = head_set.draft_ids
        if self.max_depth and not all(_headroom(c) > 0 for c in self.cache):
            kinds = {type(c).__name__ for c in self.cache if not _headroom(c)}
            raise MTPDError(
                f"this model's caches ({', '.join(sorted(kinds))}) cannot be rolled back, "
                "so drafts cannot be verified: use --num-draft 0"
            )

    def can_verify(self, d: int) -> bool:
        """Whether d drafts can be verified and rolled back.  A rotating
        (sliding-window) cache can be trimmed only until it wraps: once the
        verify forward would fill it, drafting stops for the rest of the
        generation and decoding goes on plainly, which is always lossless."""
        return all(_headroom(c) > d for c in self.cache)

    def tail_start(self, k: int, committed: Optional[List[int]] = None) -> int:
        """First position of depth k's tail: the next depth's committed count
        (the backbone's tail starts at depth 1's; the deepest keeps none)."""
        c = self.committed if committed is None else committed
        if k == 0:
            return c[1]
        return c[k + 1] if k < self.max_depth else c[k]


def _headroom(cache) -> float:
    """How many more tokens `cache` takes while staying trimmable."""
    inner = getattr(cache, "caches", None)
    if inner is not None:  # CacheList
        return min(_headroom(c) for c in inner)
    if not cache.is_trimmable():
        return 0
    max_size = getattr(cache, "max_size", None)
    if max_size is None:
        return float("inf")
    return max_size - cache.offset - 1


def _concat(a: Optional[mx.array], b: mx.array) -> mx.array:
    return b if a is None or a.shape[0] == 0 else mx.concatenate([a, b], axis=0)


def mtp_generate_step(
    prompt: mx.array,
    model: nn.Module,
    head_set: Optional[HeadSet] = None,
    *,
    num_draft: int = 3,
    loop: Optional[str] = None,
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    min_p: float = 0.0,
    min_tokens_to_keep: int = 1,
    prefill_step_size: int = 2048,
    stats: Optional[SpecStats] = None,
    state: Optional[DraftState] = None,
) -> Generator[Tuple[int, mx.array, bool], None, None]:
    """Yield (token, logprobs, from_draft) like mlx-lm's `speculative_generate_step`.

    num_draft = 0 is plain decoding through the same loop.  num_draft may
    exceed the number of heads: deeper depths loop the trained heads
    (`loop`: 'last' or 'cycle', default from the head set).  `state`, when
    given, is a fresh :class:`DraftState` the loop fills, so callers can
    inspect or keep the caches.
    """
    if num_draft < 0:
        raise MTPDError(f"--num-draft must be >= 0 (got {num_draft})")
    if num_draft > 0 and head_set is None:
        raise MTPDError("drafting needs MTP heads: pass --heads, or --num-draft 0")
    prompt_list = prompt.tolist() if isinstance(prompt, mx.array) else list(prompt)
    if len(prompt_list) == 0:
        raise MTPDError("the prompt is empty: give at least one token")
    transform = make_logprobs_transform(temp, top_p, top_k, min_p, min_tokens_to_keep)
    stats = stats if stats is not None else SpecStats()
    stats.num_draft = num_draft
    st = state if state is not None else DraftState(model, head_set, num_draft, loop)
    st.tokens = list(prompt_list)

    def forward(tokens: mx.array):
        if st.max_depth:
            return st.backbone.forward(tokens, st.cache)
        return model(tokens[None], cache=st.cache)[0], None

    # Prefill all but the last prompt token in chunks, as mlx-lm does, keeping
    # the hidden states (not the logits: they are never evaluated).
    y = mx.array(prompt_list, mx.uint32)
    hiddens = []
    while y.size > 1:
        n = min(prefill_step_size, y.size - 1)
        _, h = forward(y[:n])
        mx.eval([c.state for c in st.cache] + ([h] if h is not None else []))
        if h is not None:
            hiddens.append(h)
        y = y[n:]
        mx.clear_cache()
    logits, h = forward(y)
    if h is not None:
        hiddens.append(h)
        st.tail[0] = mx.concatenate(hiddens, axis=0) if len(hiddens) > 1 else hiddens[0]
    first, lp = _pick(logits[-1:], transform)
    if st.max_depth == 0:
        yield from _plain_decode(st, first, lp, transform, max_tokens, stats)
        return
    mx.eval(first)
    token = first.item()
    st.tokens.append(token)
    stats.emitted += 1
    yield token, lp[0], False
    emitted = 1

    while max_tokens < 0 or emitted < max_tokens:
        remaining = max_tokens - emitted if max_tokens >= 0 else num_draft + 1
        d = min(num_draft, remaining - 1)
        if d and not st.can_verify(d):
            d = 0
            stats.fallback = "sliding-window cache full: plain decoding"
        tic = time.perf_counter()
        out = _step(st, d, transform)
        new_tokens, a, rows = out
        stats.record(d, a)
        stats.step_time += time.perf_counter() - tic
        for i, t in enumerate(new_tokens):
            yield t, rows[i], i < a
            emitted += 1
            if max_tokens >= 0 and emitted >= max_tokens:
                return


def _plain_decode(st: DraftState, y: mx.array, lp: mx.array, transform, max_tokens: int, stats):
    """num_draft = 0: one token per forward, the next forward queued with
    mx.async_eval before the current token is read, as mlx-lm's generate_step."""

    def step(y):
        logits = st.model(y[None].astype(mx.uint32), cache=st.cache)[0]
        return _pick(logits[-1:], transform)

    mx.async_eval(y, lp)
    n = 0
    while True:
        if max_tokens < 0 or n + 1 < max_tokens:
            next_y, next_lp = step(y)
            mx.async_eval(next_y, next_lp)
        token = y.item()
        st.tokens.append(token)
        if n:
            stats.record(0, 0)
        else:
            stats.emitted += 1
        yield token, lp[0], False
        n += 1
        if max_tokens >= 0 and n >= max_tokens:
            return
        if n % 256 == 0:
            mx.clear_cache()
        y, lp = next_y, next_lp


def _pick(logits: mx.array, transform):
    lp = logits.astype(mx.float32)
    lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
    if transform is None:
        return mx.argmax(lp, axis=-1), lp
    return mx.random.categorical(transform(logits)), lp


def _draft(st: DraftState, d: int, transform):
    """Build (lazily) the depth calls: drafts d_{n+1..n+d}, their q, each depth's stream."""
    n = len(st.tokens) - 1
    tokens = st.tokens
    drafts: List[mx.array] = []
    qs: List[mx.array] = []
    streams: List[mx.array] = [None] * (d + 1)
    prev, prev_start = st.tail[0], st.committed[1]
    streams[0] = prev
    for k in range(1, d + 1):
        start = st.committed[k]
        hid = prev[start - prev_start :]
        true_ids = tokens[start + k : n + 1]
        first_draft = max(start + k, n + 1) - (n + 1)
        parts = []
        if true_ids:
            parts.append(mx.array(true_ids, mx.uint32))
        parts.extend(x.reshape(1).astype(mx.uint32) for x in drafts[first_draft : k - 1])
        tok = parts[0] if len(parts) == 1 else mx.concatenate(parts)
        head = st.heads[k - 1]
        out = head(hid, st.backbone.embed_tokens(tok), st.depth_cache[k - 1])
        logits = st.project(head.norm(out[-1:]))[0]
        if transform is None:
            choice = mx.argmax(logits)
        else:
            lq = transform(logits)
            choice = mx.random.categorical(lq)
            q = mx.exp(lq)
            if st.draft_ids is not None:
                q = mx.zeros((st.backbone.vocab_size,), q.dtype).at[st.draft_ids].add(q)
            qs.append(q)
        token = st.draft_ids[choice] if st.draft_ids is not None else choice
        drafts.append(token.astype(mx.uint32))
        tail = st.tail[k]
        prev = _concat(tail, out)
        prev_start = st.tail_start(k)
        streams[k] = prev
    return drafts, qs, streams


def _step(st: DraftState, d: int, transform):
    n = len(st.tokens) - 1
    drafts, qs, streams = _draft(st, d, transform) if d else ([], [], [None])
    draft_arr = mx.stack(drafts) if drafts else mx.zeros((0,), mx.uint32)
    verify_in = mx.concatenate([mx.array([st.tokens[-1]], mx.uint32), draft_arr])
    if st.max_depth:
        logits, hidden = st.backbone.forward(verify_in, st.cache)
    else:
        logits, hidden = st.model(verify_in[None], cache=st.cache)[0], None
    if transform is None:
        a_arr, fixes = accept_greedy(draft_arr, logits)
    else:
        q = mx.stack(qs) if qs else mx.zeros((0, logits.shape[-1]))
        a_arr, fixes = accept_sampled(draft_arr, q, transform(logits))
    mx.eval(a_arr, fixes, draft_arr)
    a = a_arr.item()
    new_tokens = draft_arr[:a].tolist() + [fixes[a].item()]

    # Roll back: the backbone keeps t_n and the accepted drafts.
    if d - a:
        trim_prompt_cache(st.cache, d - a)
    if st.max_depth:
        _rollback_depths(st, d, a, n, hidden, streams)
    st.tokens.extend(new_tokens)
    lp = logits.astype(mx.float32)
    rows = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
    return new_tokens, a, rows


def _rollback_depths(st: DraftState, d: int, a: int, n: int, hidden: mx.array, streams) -> None:
    """Depth k keeps its entries whose input token t_{j+k} was accepted: j <= n+a-k."""
    old = list(st.committed)
    new = list(st.committed)
    for k in range(1, d + 1):
        new[k] = min(n, n - k + 1 + a)
        st.depth_cache[k - 1].trim(n - new[k])
    def new_tail_start(k):
        return st.tail_start(k, new)

    def old_tail_start(k):
        return st.tail_start(k, old)

    # Backbone stream: positions [old c1, n-1] ++ verified hiddens [n, n+a].
    s0 = _concat(st.tail[0], hidden[: a + 1])
    st.committed = new
    st.tail[0] = s0[new_tail_start(0) - old_tail_start(0) :]
    for k in range(1, d + 1):
        s = streams[k]  # positions [old tail start of k, n-1]
        lo = new_tail_start(k) - old_tail_start(k)
        hi = new[k] - old_tail_start(k)
        st.tail[k] = s[lo:hi]
