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
depth without a host round-trip.  The heads are one draft source
(:mod:`mlx_mtpd.head_drafts`), the suffix index over the conversation another
(:mod:`mlx_mtpd.suffix`); :class:`~mlx_mtpd.planner.DraftPlanner` chooses
between them and plain decoding before every step.  The design, the caches and
the planner are described in docs/DESIGN.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Generator, List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import ArraysCache, KVCache, trim_prompt_cache

from . import head_drafts
from .depths import DepthCaches
from . import tree as tree_drafts
from .errors import MTPDError
from .heads import Backbone, HeadSet
from .planner import DRAFT_SOURCES, MARGIN, DraftPlanner, parse_num_draft  # noqa: F401  (re-exported)
from .suffix import SEPARATOR, AnswerMemory, SuffixIndex, prompt_lookup  # noqa: F401  (re-exported)
from .kvcache import KVOptions, WindowKVCache, prefill_masks, windowed, wrapped

# Greedy speculative output may differ from plain decoding only where the
# backbone's top-two logits are closer than this (float32; see docs/DESIGN.md,
# "The contract"): verifying several tokens at once changes matmul shapes.
TIE_TOLERANCE = {mx.float32: 1e-3, mx.float16: 0.15, mx.bfloat16: 0.25}
# Under a cluster, plain decoding goes in bursts this long: rank 0 can stop
# every rank between two of them.
DIST_PLAIN_BURST = 32
# A position whose token is not known (a prompt cache file's prefix): the
# suffix index's separator, which no match runs across.
UNKNOWN = SEPARATOR


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
    sources: dict = field(default_factory=dict)  # steps by kind: plain, heads, lookup
    match_checks: int = 0  # suffix-match checks after plainly decoded tokens (they may end a burst)
    match_check_time: float = 0.0  # seconds spent in them (host side)
    first_step: Optional[str] = None  # the kind of the first step after the first token (of one answer)
    # Seconds per part of the drafting steps (host: "plan", "build" (the drafts' and the
    # verification's graph), "rollback"; "eval": the device computing while the host waits)
    parts: dict = field(default_factory=dict)
    tree_steps: int = 0  # head steps that verified a tree
    tree_tokens: int = 0  # alternatives verified in them
    tree_hits: int = 0  # steps where an alternative was accepted
    branch_accepted: int = 0  # tokens accepted below an accepted alternative (a fork's branch)
    # [position][rank - 2]: alternatives tried where the chain stopped, and accepted
    rank_reached: List[List[int]] = field(default_factory=list)
    rank_accepted: List[List[int]] = field(default_factory=list)

    def record(self, num_draft: int, accepted: int, widths=None, a_chain: int = 0, rank: int = 0) -> None:
        if len(self.drafted) < num_draft:
            grow = num_draft - len(self.drafted)
            for lst in (self.drafted, self.reached, self.accepted):
                lst.extend([0] * grow)
        self.forwards += 1
        self.emitted += accepted + 1
        if num_draft == 0:
            return
        self.rounds += 1
        if widths:
            self.tree_steps += 1
            self.tree_tokens += tree_drafts.tree_size(widths) - 1 - len(widths)
            if rank:
                self.tree_hits += 1
                self.branch_accepted += max(accepted - a_chain - 1, 0)
            if a_chain < len(widths) and widths[a_chain] > 1:
                for lst in (self.rank_reached, self.rank_accepted):
                    while len(lst) <= a_chain:
                        lst.append([0] * (tree_drafts.MAX_WIDTH - 1))
                for r in range(2, (rank or widths[a_chain]) + 1):
                    self.rank_reached[a_chain][r - 2] += 1
                    self.rank_accepted[a_chain][r - 2] += r == rank
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
        self.match_checks += other.match_checks
        self.match_check_time += other.match_check_time
        self.tree_steps += other.tree_steps
        self.tree_tokens += other.tree_tokens
        self.tree_hits += other.tree_hits
        self.branch_accepted += other.branch_accepted
        for name in ("rank_reached", "rank_accepted"):
            mine, theirs = getattr(self, name), getattr(other, name)
            while len(mine) < len(theirs):
                mine.append([0] * (tree_drafts.MAX_WIDTH - 1))
            for j, row in enumerate(theirs):
                mine[j] = [a + b for a, b in zip(mine[j], row)]
        for part, t in other.parts.items():
            self.parts[part] = self.parts.get(part, 0.0) + t
        self.num_draft = other.num_draft
        for kind, n_steps in other.sources.items():
            self.sources[kind] = self.sources.get(kind, 0) + n_steps
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
            "steps_by_source": dict(self.sources),
            "match_checks": self.match_checks,
            "match_check_seconds": self.match_check_time,
            "first_step": self.first_step,
            "step_parts_seconds": dict(self.parts),
            "tree_steps": self.tree_steps,
            "tree_alternatives": self.tree_tokens,
            "tree_hits": self.tree_hits,
            "branch_accepted": self.branch_accepted,
            "rank_acceptance": self.rank_acceptance,
        }

    @property
    def rank_acceptance(self) -> List[List[Optional[float]]]:
        """[position][rank - 2]: how often a tree's rank-r alternative was accepted
        where the chain stopped and the better ones were rejected (None: never tried)."""
        return [[a / n if n else None for a, n in zip(acc, rea)]
                for acc, rea in zip(self.rank_accepted, self.rank_reached)]


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


def accept_verbatim(drafts: mx.array, logits: mx.array, transform):
    """Acceptance of drafts proposed without a distribution (the suffix index's):
    greedy, or speculative sampling with q one-hot at each draft.  Returns what
    accept_greedy / accept_sampled return (lazily)."""
    if transform is None:
        return accept_greedy(drafts, logits)
    nd = drafts.size
    q = mx.zeros((nd, logits.shape[-1])).at[mx.arange(nd), drafts].add(1.0)
    return accept_sampled(drafts, q, transform(logits))


class HiddenHistory:
    """The backbone's hidden states of every cached position from `hist_base`
    on, in chunks: what the heads' depth 1 takes (a DraftState's, and each row's
    of the server's running batch)."""

    hist: List[mx.array]
    hist_pos: List[int]
    hist_base: int

    def push_hidden(self, h: mx.array) -> None:
        start = self.hist_pos[-1] + self.hist[-1].shape[0] if self.hist else self.hist_base
        self.hist.append(h)
        self.hist_pos.append(start)
        if len(self.hist) > 64:  # merge the recent chunks: one more chunk per 64 steps
            merged = mx.concatenate(self.hist[-64:], axis=0)
            self.hist[-64:] = [merged]
            self.hist_pos[-64:] = [self.hist_pos[-64]]

    def hidden_range(self, lo: int, hi: int) -> mx.array:
        parts = []
        for h, s in zip(reversed(self.hist), reversed(self.hist_pos)):
            e = s + h.shape[0]
            if e <= lo:
                break
            if s < hi:
                parts.append(h[max(lo - s, 0) : min(hi, e) - s])
        parts.reverse()
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)

    def _truncate_hidden(self, n: int) -> None:
        while self.hist and self.hist_pos[-1] >= n:
            self.hist.pop()
            self.hist_pos.pop()
        if self.hist and self.hist_pos[-1] + self.hist[-1].shape[0] > n:
            self.hist[-1] = self.hist[-1][: n - self.hist_pos[-1]]


class DraftState(HiddenHistory):
    """Every cache the loop keeps: the backbone's, one per depth, the backbone's
    hidden states of every cached position (2.3 KB a token for SmolLM2, so a
    later turn can rewind the depths to any common prefix), and the recent
    outputs each depth has not yet handed to the next.

    A state outlives one generation: given again with a prompt that extends
    what it holds (the next turn of a chat), only the new tokens are prefilled.
    Its suffix index follows its tokens (every turn, the prompt, the tokens
    generated so far); `memory`, when set, holds earlier answers to draft from.
    """

    memory: Optional[AnswerMemory] = None
    prompt_len = 0  # the last prompt served from this state (the server tells conversations apart by it)
    # the distribution sampled head drafts are drawn from (None: the backbone's, `transform`);
    # set per generation (HeadSet.draft_temperature)
    draft_transform: Optional[Callable[[mx.array], mx.array]] = None

    def __init__(self, model: nn.Module, head_set: Optional[HeadSet], max_depth: int, loop: Optional[str] = None,
                 kv: Optional[KVOptions] = None):
        self.model = model
        self.kv = kv or KVOptions()
        self.head_set = head_set
        self.max_depth = max_depth if head_set is not None else 0
        self.loop = loop
        self.backbone = Backbone(model, head_set.features, head_set.sharding) if head_set is not None else None
        self.heads = [head_set.head_for_depth(d, loop) for d in range(1, self.max_depth + 1)]
        if self.max_depth:
            self.project = self.backbone.projection_rows(head_set.draft_ids)
            self.draft_ids = head_set.draft_ids
            self.entry = head_set.entry_hidden(self.backbone)
            self.feedback_post = head_set.feedback_post_norm
        self.reset()
        if (self.max_depth or head_set is not None) and not all(_headroom(c) > 0 for c in self.cache):
            kinds = {type(c).__name__ for c in self.cache if not _headroom(c)}
            raise MTPDError(
                f"this model's caches ({', '.join(sorted(kinds))}) cannot be rolled back, "
                "so drafts cannot be verified: use --num-draft 0"
            )

    def reset(self) -> None:
        from mlx_lm.models.cache import make_prompt_cache

        # mlx-lm's caches (a rotating one per layer under --max-kv-size), the
        # rotating ones able to take back a rejected draft past their window
        self.cache = windowed(make_prompt_cache(self.model, self.kv.max_kv_size))
        self.quantized = self.kv.kv_bits is None  # every cache that will ever be quantized is
        # Recurrent layers (linear attention, SSM) cannot be trimmed: their state
        # is saved before each verification and restored on a rejection.
        self.restorable = [c for c in self.cache if _restorable(c)]
        # why this model's head drafts stay chains (None: trees can be verified)
        self.tree_reason, self.rope_owners = (tree_drafts.tree_support_and_ropes(self.model, self.cache)
                                              if self.max_depth else ("no heads", None))
        self.length = 0  # tokens in the backbone cache
        self.unknown = 0  # leading positions the heads never saw (an adopted prompt cache's)
        self.depths = DepthCaches(self.max_depth)
        self.tokens: List[int] = []
        self.index = SuffixIndex()
        self.hist: List[mx.array] = []  # backbone hidden states, in chunks
        self.hist_pos: List[int] = []  # first position of each chunk
        self.hist_base = 0  # the first position with a hidden state

    def adopt(self, caches: List, tokens: Optional[List[int]] = None) -> int:
        """Start from a prompt cache (mlx-lm's file, `mlx_lm.cache_prompt`, or
        the server's kept caches of another conversation): the backbone's
        caches hold n positions.  Their `tokens`, when known, are the context
        (the suffix index matches them); otherwise they stand as UNKNOWN tokens
        (never matched) and a prompt given to the loop is `[UNKNOWN] * n + ids`.
        Either way the heads start after them (their own caches hold no entry
        for them: the heads draft from what follows, the backbone verifies as
        always), and a later rewind keeps them or starts afresh.  Returns n."""
        from mlx_lm.models.cache import make_prompt_cache

        from mlx_lm.models.cache import RotatingKVCache

        fresh = make_prompt_cache(self.model, self.kv.max_kv_size)
        if len(caches) != len(fresh) or any(
                isinstance(c, RotatingKVCache) != isinstance(f, RotatingKVCache) for c, f in zip(caches, fresh)):
            raise MTPDError("the prompt cache file was made for another model or other cache options "
                            f"({', '.join(sorted({type(c).__name__ for c in caches}))}): make it again")
        self.reset()
        self.cache = windowed(list(caches))
        self.restorable = [c for c in self.cache if _restorable(c)]
        n = max(c.offset for c in self.cache)
        if tokens is not None and len(tokens) != n:
            raise ValueError(f"{len(tokens)} tokens for caches of {n} positions")
        self.length = self.unknown = n
        self.set_tokens(list(tokens) if tokens is not None else [UNKNOWN] * n)
        self.hist_base = n
        self.depths = DepthCaches(self.max_depth, base=n)
        return n

    def set_tokens(self, tokens: List[int]) -> None:
        """The context is now `tokens` (a new prompt): the index keeps the common prefix."""
        self.tokens = list(tokens)
        self.index.sync(self.tokens)

    def push_tokens(self, new: List[int]) -> None:
        """Tokens emitted after the context (the index follows, one entry per token)."""
        self.tokens.extend(new)
        self.index.extend(new)

    # -- rollback ---------------------------------------------------------------
    def can_verify(self, d: int) -> bool:
        """Whether d drafts can be verified and rolled back (a sliding-window
        cache always: :class:`~mlx_mtpd.windows.WindowKVCache`)."""
        return all(_headroom(c) > d for c in self.cache)

    def tree_room(self, size: int) -> bool:
        """Whether a tree of `size` nodes fits before any sliding window is
        full (past it, head drafts are chains: a tree's mask and kept path
        assume the cache's positions in order from 0)."""
        return self.can_verify(size) and not wrapped(self.cache, size)

    def forward(self, tokens: mx.array):
        """(logits, hidden) of the backbone over `tokens`, through the caches; the
        hidden state is None when no heads are kept (nothing else needs it)."""
        if self.max_depth:
            out = self.backbone.forward(tokens, self.cache)
        else:
            out = self.model(tokens[None], cache=self.cache)[0], None
        if not self.quantized:
            self.quantize()
        return out

    def quantize(self) -> None:
        """--kv-bits: a full-precision cache becomes a quantized one after the
        forward that takes it to --quantized-kv-start, as mlx-lm's generate_step
        does (each entry is quantized on its own, so when it happens changes no
        value, only which forwards saw the full-precision keys)."""
        kv, done = self.kv, True
        for i, c in enumerate(self.cache):
            if type(c) is KVCache:
                if c.offset >= kv.quantized_kv_start:
                    self.cache[i] = c.to_quantized(group_size=kv.kv_group_size, bits=kv.kv_bits)
                else:
                    done = False
        self.quantized = done

    def feed(self, tokens: mx.array) -> mx.array:
        """The backbone's logits over `tokens`, which join the context (the
        hidden states kept for the heads)."""
        self.length += tokens.size
        logits, h = self.forward(tokens)
        if h is not None:
            self.push_hidden(h)
        return logits

    def common_prefix(self, prompt: List[int]) -> int:
        """How many leading tokens of `prompt` the caches hold (at most all but its last)."""
        m = min(self.length, len(prompt) - 1, len(self.tokens))
        p = 0
        while p < m and self.tokens[p] == prompt[p]:
            p += 1
        return p

    def rewind(self, prompt: List[int]) -> int:
        """Keep the longest cached prefix of `prompt` (at most all but its last
        token) and drop the rest from every cache; returns its length."""
        p = self.common_prefix(prompt)
        if p == 0 or p < self.unknown or not all(_headroom(c) > 0 or self.length == p for c in self.cache) or (
            self.restorable and p < self.length  # a recurrent state cannot go back
        ) or not all(c.can_take_back(self.length - p) for c in self.cache if isinstance(c, WindowKVCache)):
            self.reset()
            return 0
        if self.length > p:
            _trim(self.cache, self.length - p)
        self.length = p
        self.tokens = list(prompt[:p])
        if self.max_depth:
            self._truncate_hidden(p)
            self.depths.rewind(p)
        return p


def _restorable(cache) -> bool:
    """A recurrent layer's cache (linear attention, SSM): never trimmable, but its
    state can be saved and set back."""
    return isinstance(cache, ArraysCache)


def _snapshot(cache):
    """A recurrent cache's state, copied one level deep: its lists are updated
    in place (`cache[i] = new`), the arrays in them never are."""
    state = cache.state
    if isinstance(state, list):
        return list(state)
    return tuple(list(x) if isinstance(x, list) else x for x in state)


def _trim(caches, n: int) -> None:
    """Drop the last n tokens of every trimmable cache."""
    for c in caches:
        if c.is_trimmable():
            c.trim(n)


def _headroom(cache) -> float:
    """How many more tokens `cache` takes while staying trimmable (or restorable)."""
    inner = getattr(cache, "caches", None)
    if inner is not None:  # CacheList
        return min(_headroom(c) for c in inner)
    if isinstance(cache, WindowKVCache):
        return float("inf")  # it takes back what a verification added, wrapped or not
    if not cache.is_trimmable():
        return float("inf") if _restorable(cache) else 0
    max_size = getattr(cache, "max_size", None)
    if max_size is None:
        return float("inf")
    return max_size - cache.offset - 1


def mtp_generate_step(
    prompt: mx.array,
    model: nn.Module,
    head_set: Optional[HeadSet] = None,
    *,
    num_draft: Union[int, str] = 3,
    draft: str = "heads",
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
    planner: Optional[DraftPlanner] = None,
    cluster=None,
    tree="auto",
    kv: Optional[KVOptions] = None,
) -> Generator[Tuple[int, mx.array, bool], None, None]:
    """Yield (token, logprobs, from_draft) like mlx-lm's `speculative_generate_step`.

    num_draft = 0 is plain decoding through the same loop; 'auto' chooses per
    step (see :class:`DraftPlanner`).  num_draft may exceed the number of heads:
    deeper depths loop the trained heads (`loop`: 'last' or 'cycle', default
    from the head set).  `draft`: 'heads', 'prompt-lookup' or 'heads+lookup'.
    `state`, when given, is a :class:`DraftState` the loop fills and keeps: if
    it holds an earlier generation whose tokens the prompt extends, only the new
    part of the prompt is prefilled.  `planner` likewise keeps what `auto` measured.
    `cluster` (:class:`mlx_mtpd.distributed.Cluster`): the backbone is sharded
    over several ranks, which all run this loop; rank 0's plans, drafts and
    tokens are broadcast, and a generation rank 0 stops ends on every rank at
    the next step boundary (the step or burst under way is finished first).
    `tree`: head drafts as trees (:mod:`mlx_mtpd.tree`): 'auto' (the planner
    chooses each step's shape; under a fixed num_draft, from what it measured),
    None (chains) or widths per depth; chains wherever the model's caches or
    attention cannot verify a tree (`DraftState.tree_reason`), and under a cluster.
    `kv`: mlx-lm's KV cache options (:class:`~mlx_mtpd.windows.KVOptions`:
    --max-kv-size, --kv-bits, --kv-group-size, --quantized-kv-start); a given
    `state` made with other options is replaced.
    """
    planner = _planner_for(planner, num_draft, draft, tree, head_set is not None, cluster is not None)
    planner.set_temp(temp)  # the head set's acceptance measured nearest this temperature
    prompt_list = prompt.tolist() if isinstance(prompt, mx.array) else list(prompt)
    if len(prompt_list) == 0:
        raise MTPDError("the prompt is empty: give at least one token")
    transform = make_logprobs_transform(temp, top_p, top_k, min_p, min_tokens_to_keep)
    stats = stats if stats is not None else SpecStats()
    stats.num_draft = "auto" if planner.auto else planner.num_draft
    depth = planner.num_draft if planner.uses_heads else 0
    kv = kv or KVOptions()
    if state is None or (state.max_depth < depth) or (depth and state.head_set is not head_set) or (
        depth and loop is not None and state.loop != loop
    ) or state.kv != kv:
        state = DraftState(model, head_set if depth else None, depth, loop, kv)
    st = state
    st.draft_transform = (make_logprobs_transform(head_set.draft_temperature(temp), top_p, top_k, min_p,
                                                  min_tokens_to_keep)
                          if transform is not None and depth else None)
    plain_only = planner.num_draft == 0 or (st.max_depth == 0 and not planner.uses_lookup)
    if cluster is None and plain_only:
        first, lp = _prefill(st, prompt_list, 0, transform, prefill_step_size)
        yield from _plain_decode(st, first, lp, transform, max_tokens, stats)
        return
    ahead = min(planner.prefill_depth(), st.max_depth) if cluster is None else 0
    link = _Link(cluster)
    yield from link.deliver(_decode(st, prompt_list, ahead, planner, transform, max_tokens, prefill_step_size,
                                    stats, plain_only, link))


def _planner_for(planner: Optional[DraftPlanner], num_draft, draft: str, tree, has_heads: bool,
                 clustered: bool) -> DraftPlanner:
    """The planner given, or a new one; drafting sources that need heads fall
    back to the suffix index where the heads are missing and the user asked for
    no heads in particular."""
    if planner is None:
        planner = DraftPlanner(num_draft, draft, tree=tree)
    if planner.uses_heads and not has_heads:
        if planner.auto or draft == "heads+lookup":
            planner = DraftPlanner(planner.num_draft if not planner.auto else "auto", "prompt-lookup", tree=None)
        else:
            raise MTPDError("drafting needs MTP heads: pass --heads, --draft prompt-lookup, or --num-draft 0")
    if clustered:  # every burst costs the ranks one agreement: longer ones
        planner.burst = max(planner.burst, DIST_PLAIN_BURST)
    return planner


def _prefill(st: DraftState, prompt: List[int], ahead: int, transform, step_size: int, watchdog=None):
    """Prefill what the caches do not hold of `prompt`, all but its last token in
    chunks as mlx-lm does (their logits never evaluated, the hidden states kept),
    and return the first token and its logprobs, lazily.  The `ahead` head depths
    the first drafting step will use catch up on the prompt here, chunk by chunk,
    instead of all at once in that step."""
    done = st.rewind(prompt) if st.length else 0
    st.set_tokens(prompt)
    y = mx.array(prompt[done:], mx.uint32)
    with prefill_masks(st.cache):
        while y.size > 1:
            n = min(step_size, y.size - 1)
            st.feed(y[:n])
            mx.eval([c.state for c in st.cache] + st.hist[-1:] + caught_up(st, ahead))
            y = y[n:]
            mx.clear_cache()
            if watchdog is not None:
                watchdog.tick()
    first, lp = _pick(st.feed(y)[-1:], transform)
    if ahead:
        mx.async_eval(first, lp, *caught_up(st, ahead))
    return first, lp


class _Link:
    """How a generation ends, alone or under a cluster.

    Alone, a consumer that closes the generator ends it at once.  Under a
    cluster (every rank runs the loop, rank 0 decides), a generation closed by
    its consumer (end of sequence, a stop string, a client gone) finishes the
    unit it is in without yielding (the rest of a plain burst; nothing after a
    verification step), then tells the other ranks to stop at the next step
    boundary: every rank runs the same collectives.  Every exit ends with that
    one agreement unless a stop was agreed already or an error broke the link.
    """

    def __init__(self, cluster):
        self.cluster = cluster
        self.closing = False  # the consumer closed the generation: stop at the next step boundary
        self.stopped = False  # a stop was agreed (or an error: no more collectives)

    def deliver(self, tokens: Generator):
        cluster = self.cluster
        if cluster is not None:
            cluster.watchdog.arm("generating")
        try:
            for item in tokens:
                try:
                    yield item
                except GeneratorExit:
                    if cluster is None:
                        raise
                    self.closing = True
                    for _ in tokens:  # the unit under way, then the loop stops at its boundary
                        pass
                    return
        except Exception:
            self.stopped = True  # the other ranks learn of it from the link
            raise
        finally:
            tokens.close()
            if cluster is not None:
                if not self.stopped:
                    cluster.plan(None, None)  # rank 0: stop; the others: rank 0's word (a stop too)
                cluster.watchdog.disarm()

    def plan(self, st: DraftState, planner: DraftPlanner, remaining: int, plain_only: bool, stats: SpecStats):
        """This step's (kind, arg, seconds the planner took), decided by rank 0
        and agreed by every rank; None when the generation stops."""
        cluster, why = self.cluster, None
        tic = time.perf_counter()
        if cluster is None or cluster.leader:
            if plain_only:
                kind, arg = "plain", min(remaining, DIST_PLAIN_BURST)
            else:
                kind, arg, why = planner.plan(st, remaining)
        seconds = time.perf_counter() - tic
        if cluster is not None:
            plan, planner.stop_match = cluster.plan((kind, arg) if cluster.leader else None, planner.stop_match)
            if plan is None:
                self.stopped = True
                return None
            kind, arg = plan
        if why:
            stats.fallback = why
        if stats.first_step is None:
            stats.first_step = kind
        stats.sources[kind] = stats.sources.get(kind, 0) + 1
        return kind, arg, seconds


def _decode(st: DraftState, prompt: List[int], ahead: int, planner: DraftPlanner, transform, max_tokens: int,
            prefill_step_size: int, stats: SpecStats, plain_only: bool, link: _Link):
    """The drafting loop: the prefill, then before every step the planner's
    choice, then a plain burst or a verification step."""
    cluster = link.cluster
    first, lp = _prefill(st, prompt, ahead, transform, prefill_step_size,
                         cluster.watchdog if cluster is not None else None)
    if cluster is not None:
        first = cluster.tensor(first)
    mx.eval(first)
    token = first.item()
    st.push_tokens([token])
    stats.emitted += 1
    yield token, lp[0], False
    emitted = 1
    while not link.closing and (max_tokens < 0 or emitted < max_tokens):
        remaining = (max_tokens - emitted if max_tokens >= 0
                     else max(planner.num_draft, planner.lookup_cap) + planner.burst + 1)
        plan = link.plan(st, planner, remaining, plain_only, stats)
        if plan is None:
            return
        kind, arg, plan_time = plan
        if kind == "plain":
            out = _timed_burst(st, planner, arg, transform, stats, cluster)
        else:
            out = _draft_step(st, planner, kind, arg, transform, stats, cluster, plan_time)
        for item in out:
            yield item
            emitted += 1
            if max_tokens >= 0 and emitted >= max_tokens:
                return


def _timed_burst(st: DraftState, planner: DraftPlanner, n: int, transform, stats: SpecStats, cluster):
    """A plain burst, its time (before the consumer's of its last token) told to the planner."""
    tic = time.perf_counter()
    n_out = 0
    for tok, row, last in _plain_burst(st, n, transform, stats, planner.stop_match, cluster):
        n_out += 1
        if last:
            planner.observe_plain(n_out, time.perf_counter() - tic)
        yield tok, row, False


def _draft_step(st: DraftState, planner: DraftPlanner, kind: str, arg, transform, stats: SpecStats, cluster,
                plan_time: float):
    """One verification step of head drafts (`arg` = d) or of the suffix index's
    (`arg`, a Proposal), measured and told to the planner; [(token, logprobs,
    from_draft)]."""
    tic = time.perf_counter()
    heads = kind == "heads"
    lags = st.depths.lags(st.length) if heads else None
    widths = planner.widths if heads and cluster is None and st.tree_reason is None else None
    if widths and not st.tree_room(tree_drafts.tree_size(widths)):  # a sliding window without room for the tree
        widths = None
    new_tokens, a, rows, (a_chain, rank) = _step(
        st, arg if heads else 0, transform, lookup=None if heads else arg, cluster=cluster, parts=stats.parts,
        widths=widths)
    stats.parts["plan"] = stats.parts.get("plan", 0.0) + plan_time
    d = arg if heads else len(arg)
    seconds = time.perf_counter() - tic
    stats.record(d, a, widths, a_chain, rank)
    stats.step_time += seconds
    # A long catch-up (after plain bursts or a new turn) is not a typical step's
    # cost: it is measured apart, per position caught up (the planner adds it).
    catching_up = heads and planner.catch_up_work(d, lags) > 0
    typical = None if catching_up else seconds
    if catching_up:
        usual = planner.tree_cost(d, tree_drafts.tree_size(widths)) if widths else planner.step_cost("heads", d)
        planner.observe_catch_up(d, lags, seconds, usual)
    if widths:
        planner.observe("heads", d, a_chain, None)
        planner.observe_tree(d, widths, a_chain, rank, typical, accepted=a)
    else:
        planner.observe(kind, d, a, typical, match=0 if heads else arg.match)
    return [(t, rows[i], i < a) for i, t in enumerate(new_tokens)]


def caught_up(st: DraftState, depths: int, reserve: int = 0) -> List[mx.array]:
    """Catch depths 1..`depths` up on every known position (lazily; see
    head_drafts.catch_up); what to evaluate."""
    if not depths or not head_drafts.catch_up(st, depths, reserve):
        return []
    return st.depths.arrays(depths)


def _plain_decode(st: DraftState, y: mx.array, lp: mx.array, transform, max_tokens: int, stats):
    """No drafting at all: one token per forward, the next forward queued with
    mx.async_eval before the current token is read, as mlx-lm's generate_step."""

    def step(y):
        st.length += 1
        logits = st.model(y[None].astype(mx.uint32), cache=st.cache)[0]
        if not st.quantized:
            st.quantize()
        return _pick(logits[-1:], transform)

    mx.async_eval(y, lp)
    n = 0
    while True:
        if max_tokens < 0 or n + 1 < max_tokens:
            next_y, next_lp = step(y)
            mx.async_eval(next_y, next_lp)
        token = y.item()
        st.push_tokens([token])
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


def _plain_burst(st: DraftState, n: int, transform, stats, stop_match: Optional[int] = None, cluster=None):
    """Up to n tokens decoded plainly and pipelined inside the drafting loop,
    the backbone's hidden states kept so that the heads can catch up later.
    Yields (token, logprobs, last).  With `stop_match`, the burst ends as soon
    as the context's suffix matches an earlier passage that long: the forward
    already queued gives one more token, and nothing is wasted."""

    def fwd(y):
        y, lp = _pick(st.feed(y)[-1:], transform)
        return (cluster.tensor(y), lp) if cluster is not None else (y, lp)

    nxt = fwd(mx.array([st.tokens[-1]], mx.uint32))
    mx.async_eval(*nxt)
    stop = False
    for i in range(n):
        y, lp = nxt
        last = stop or i + 1 == n
        if not last:
            nxt = fwd(y.astype(mx.uint32))
            mx.async_eval(*nxt)
        token = y.item()
        st.push_tokens([token])
        stats.record(0, 0)
        if stop_match and not last:
            tic = time.perf_counter()
            stop = st.index.match_length() >= stop_match
            stats.match_checks += 1
            stats.match_check_time += time.perf_counter() - tic
        yield token, lp[0], last
        if last:
            return


def _pick(logits: mx.array, transform):
    lp = logits.astype(mx.float32)
    lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
    if transform is None:
        return mx.argmax(lp, axis=-1), lp
    return mx.random.categorical(transform(logits)), lp


def _step(st: DraftState, d: int, transform, lookup: Optional[List[int]] = None, cluster=None,
          parts: Optional[dict] = None, widths: Optional[Tuple[int, ...]] = None):
    """One verification step: d head drafts (a tree when `widths` gives some depth
    more than one candidate, :mod:`mlx_mtpd.tree`), or the given lookup drafts.
    `parts` accumulates the seconds of its parts (see SpecStats.parts).  Returns
    (tokens, accepted, logprob rows, (chain drafts accepted, rank of an accepted
    alternative or 0))."""
    t_start = time.perf_counter()
    n = len(st.tokens) - 1
    alts = None
    if lookup:
        draft_arr = mx.array(list(lookup), mx.uint32)
        qs, streams = [], [None]  # q is one-hot at the drafts: built below
    else:
        q_transform = (st.draft_transform or transform) if transform is not None else None
        drafts, qs, streams, alts = head_drafts.draft(st, d, q_transform, widths) if d else ([], [], [None], None)
        draft_arr = mx.stack(drafts) if drafts else mx.zeros((0,), mx.uint32)
        if cluster is not None and drafts:  # every rank verifies rank 0's drafts
            draft_arr = cluster.tensor(draft_arr)
            if st.backbone.pipeline_group is not None:
                # a stage's receive has no inputs: MLX could order it before this
                # broadcast on one stage and after it on another
                mx.eval(draft_arr)
    if alts is not None and any(a is not None for a in alts):
        return _tree_step(st, d, transform, draft_arr, qs, streams, alts, widths, parts, t_start)
    nd = draft_arr.size
    verify_in = mx.concatenate([mx.array([st.tokens[-1]], mx.uint32), draft_arr])
    saved = [_snapshot(c) for c in st.restorable] if st.restorable and nd else None

    logits, hidden = st.forward(verify_in)
    if transform is None or lookup:  # greedy, or a deterministic proposal
        a_arr, fixes = accept_verbatim(draft_arr, logits, transform)
    else:
        q = mx.stack(qs) if qs else mx.zeros((0, logits.shape[-1]))
        a_arr, fixes = accept_sampled(draft_arr, q, transform(logits))
    if cluster is not None:  # rank 0's acceptance and tokens, in this step's graph
        a_arr, fixes = cluster.tensor(a_arr), cluster.tensor(fixes)
    t_built = time.perf_counter()
    mx.eval(a_arr, fixes, draft_arr)
    a = a_arr.item()
    new_tokens = draft_arr[:a].tolist() + [fixes[a].item()]
    t_evaluated = time.perf_counter()

    # Roll back: the backbone keeps t_n and the accepted drafts.
    if nd - a and saved is not None:
        # Recurrent layers: back to the state before this step, then the
        # accepted tokens once more (one extra forward, only on a rejection).
        _trim(st.cache, nd + 1)
        for c, state in zip(st.restorable, saved):
            c.state = state
        _, hidden = st.forward(verify_in[: a + 1])
    elif nd - a:
        trim_prompt_cache(st.cache, nd - a)
    st.length += a + 1
    if st.max_depth:
        st.push_hidden(hidden[: a + 1])
        st.depths.rollback(0 if lookup else d, a, n, streams)
    st.push_tokens(new_tokens)
    rows = _rows(logits)
    _add_parts(parts, t_start, t_built, t_evaluated)
    return new_tokens, a, rows, (a, 0)


def _rows(logits: mx.array) -> mx.array:
    lp = logits.astype(mx.float32)
    return lp - mx.logsumexp(lp, axis=-1, keepdims=True)


def _add_parts(parts: Optional[dict], t_start: float, t_built: float, t_evaluated: float) -> None:
    if parts is not None:
        for part, t in (("build", t_built - t_start), ("eval", t_evaluated - t_built),
                        ("rollback", time.perf_counter() - t_evaluated)):
            parts[part] = parts.get(part, 0.0) + t


def _tree_step(st: DraftState, d: int, transform, chain: mx.array, qs, streams, alts, widths, parts, t_start):
    """The verification of a tree (:mod:`mlx_mtpd.tree`): the chain, each depth's
    alternatives and the branches below depth 1's in one forward; the accepted
    path's cache entries kept, the heads rolled back to the chain drafts accepted."""
    n = len(st.tokens) - 1
    t = tree_drafts.Tree.caterpillar(d, widths)
    alt_list = [a for a in alts if a is not None]
    fork_q: List[mx.array] = []
    branch_tokens: List[mx.array] = []
    if t.branch_nodes:
        q_transform = (st.draft_transform or transform) if transform is not None else None
        by_depth, fork_q = head_drafts.fork_drafts(st, alts[0], len(t.branch_nodes[0]), streams, q_transform)
        branch_tokens = [mx.stack(by_depth, axis=1).reshape(-1)]  # branch by branch, as the tree lays them out
    verify_in = mx.concatenate([mx.array([st.tokens[-1]], mx.uint32), chain] + alt_list + branch_tokens)
    prefix = st.length
    with tree_drafts.tree_attention(st.model, st.cache, t, st.rope_owners):
        logits, hidden = st.forward(verify_in)
    if transform is None:
        target = mx.argmax(logits, axis=-1)
        outs = (target,)
    else:
        # the q of each node's first child: the chain's next draft, or its branch's
        q_of = dict(enumerate(qs))
        for j, branch in enumerate(t.branch_nodes):
            for k, node in enumerate([t.alt_nodes[0][j]] + branch[:-1]):
                q_of[node] = fork_q[k][j]
        first_q = mx.stack([q_of[x] for x in t.decision_nodes])
        outs = tree_drafts.accept_tree_sampled(t, verify_in, first_q, transform(logits))
    t_built = time.perf_counter()
    mx.eval(verify_in, *outs)
    nodes = verify_in.tolist()
    if transform is None:
        ok, alt_ok, fallback, bonus = tree_drafts.greedy_outcome(t, nodes, outs[0].tolist())
    else:
        ok, alt_ok, fallback, bonus = (x.tolist() for x in outs)
    new_tokens, keep, a_chain, rank = tree_drafts.walk(t, nodes, ok, alt_ok, fallback, bonus)
    t_evaluated = time.perf_counter()

    tree_drafts.keep_path(st.cache, prefix, t.size, keep)
    st.length = prefix + len(keep)
    st.push_hidden(hidden[mx.array(keep, mx.uint32)] if rank else hidden[: len(keep)])
    st.depths.rollback(d, a_chain, n, streams)
    st.push_tokens(new_tokens)
    rows = _rows(logits[mx.array(keep, mx.uint32)] if rank else logits[: len(keep)])
    _add_parts(parts, t_start, t_built, t_evaluated)
    return new_tokens, len(new_tokens) - 1, rows, (a_chain, rank)
