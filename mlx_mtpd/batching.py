"""Several requests decoded together: the server's running batch.

mlx-lm's BatchGenerator does the batching (left-padded batch caches, requests
joining and leaving between steps, a sampler per request), and its
LRUPromptCache keeps recent conversations' caches, so a client that resends its
conversation with one more turn pays only for the new tokens even when other
clients came in between.  What is this project's: the hand-over of an answer
under way from the speculative single-request loop into the batch (its prompt
and the tokens already sent are prefilled, and it goes on from there: a greedy
answer continues exactly as it would have, a sampled one from the same
distribution), and the per-request text, stop strings and cancellation.

Inside the batch each request drafts from its own conversation (the suffix
index: what followed the longest earlier match of its text's end) or, given a
head set (server --batch-heads), with the MTP heads (each row keeps the
backbone's hidden states from its prompt on, and its own
depth caches) when that pays: the rows'
drafts, of different lengths, are verified together in one forward of
B x (n + 1) tokens, each row accepts its own prefix (greedy, or
speculative sampling from its own distribution), and each row's rejected
positions go to its left padding (drop_tails),
so every row goes on as if it had decoded alone.  Before every step a small
planner weighs the expected tokens of the drafts (acceptance measured per match
length, and the heads' per draft position and temperature, as the
single-request planner does) against the measured cost of a verification of
that length at this batch size plus the rows' head drafts, and otherwise
decodes plainly, pipelined, as mlx-lm does (the hidden states kept, so the
heads catch up at their next draft).  A request alone is served by the speculative loop
(heads and lookup).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import mlx.core as mx

from .engine import HiddenHistory

CACHE_KEY = "model"  # one model per server: the prompt cache's key


def batchable(model, kv=None) -> bool:
    """Whether mlx-lm can batch this model's caches (as mlx_lm.server decides) with
    these KV options (a quantized KV cache is served one request at a time)."""
    from mlx_lm.models.cache import make_prompt_cache

    if kv is not None and getattr(kv, "kv_bits", None):
        return False
    return all(hasattr(c, "merge") for c in make_prompt_cache(model))


def kept_caches(size: int = 10, nbytes: int = 1 << 62):
    """Recent conversations' caches (mlx-lm's LRUPromptCache: bounded in count and bytes)."""
    from mlx_lm.models.cache import LRUPromptCache

    return LRUPromptCache(max_size=size, max_bytes=nbytes)


def plain_caches(caches) -> bool:
    """Whether these are mlx-lm's plain KV caches, which the kept caches and the batch share."""
    from mlx_lm.models.cache import KVCache

    return bool(caches) and all(type(c) is KVCache for c in caches)


def keep(kept, tokens: List[int], caches) -> None:
    """A copy of `caches` (holding `tokens`) among the kept ones: the owner goes on
    changing its own."""
    import copy

    if tokens and plain_caches(caches):
        kept.insert_cache(CACHE_KEY, list(tokens), copy.deepcopy(list(caches)))


def _reach(kept, ids: List[int]) -> Optional[int]:
    """How many tokens of `ids` the kept caches would give, found without copying
    them (None where this mlx-lm's LRUPromptCache does not tell)."""
    search = getattr(getattr(kept, "_trie", None), "search", None)
    if search is None:
        return None
    r = search(CACHE_KEY, list(ids))
    if r.exact is not None:
        return len(ids) - 1
    short = len(r.shorter) if r.shorter is not None else 0
    if r.longer is not None and r.common_prefix > short:
        return min(len(ids) - 1, r.common_prefix)
    return short


def nearest(kept, ids: List[int], beyond: int = 0):
    """(caches, n): a copy of the kept caches holding the longest prefix of `ids`
    (at most all but its last token, so a forward remains), or (None, 0) when
    none holds more than `beyond` tokens."""
    from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

    reach = _reach(kept, ids)
    if reach is not None and reach <= beyond:
        return None, 0
    cache, rest = kept.fetch_nearest_cache(CACHE_KEY, list(ids))
    if cache is None:
        return None, 0
    if not rest:  # the whole sequence is cached: feed its last token again
        if not can_trim_prompt_cache(cache):
            return None, 0
        trim_prompt_cache(cache, 1)
        rest = ids[-1:]
    n = len(ids) - len(rest)
    return (cache, n) if n > beyond else (None, 0)


@dataclass
class Row:
    """One request in the batch."""

    job: Any
    sink: Any  # the request's TextSink (server.py): text, stop strings, events
    prompt_tokens: int
    cached: int  # prompt tokens found in the prompt cache
    generated: int = 0  # tokens of the answer so far (those before the hand-over included)
    detokenizer: Any = None
    extra: Dict[str, Any] = field(default_factory=dict)


class Batch:
    """The running batch: `add` a request (with any answer tokens it already
    has), `step` until it is empty; every finished or cancelled request calls
    `done(row, finish_reason)`."""

    def __init__(self, model, tokenizer, max_batch: int = 8, cache=None, draft: bool = True, heads=None,
                 lookup: bool = True):
        from mlx_lm.generate import BatchGenerator

        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        eos = list(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
        self.gen = BatchGenerator(model, stop_tokens=[[t] for t in eos], completion_batch_size=max_batch,
                                  prefill_batch_size=min(max_batch, 8))
        self.cache = cache if cache is not None else kept_caches()  # shared with the server's other path
        self.rows: Dict[int, Row] = {}
        self.steps = 0
        self.samplers: Dict[tuple, Any] = {}
        # each row drafts from its own conversation where it pays (see the module's text)
        self.drafter = BatchDrafter(model=model, head_set=heads, lookup=lookup) if draft else None
        if draft:
            self.gen._generation_batch = drafting_generation(model, self.gen.sampler, self.drafter)
            if self.drafter.kit is not None:  # the rows' heads see their prompts
                self.gen._prompt_batch = capturing_prompts(model, self.gen.sampler, self.drafter,
                                                           self.gen.prefill_step_size)

    def __len__(self) -> int:
        return len(self.rows)

    def full(self) -> bool:
        """Room for no more: `max_batch` decoding and as many again waiting inside the
        generator, which prefills them as rows free (so a freed row is refilled in the
        same step, as mlx_lm.server does; they keep their arrival order)."""
        return len(self.rows) >= 2 * self.max_batch

    def add(self, job, sink, ids: List[int], max_tokens: int, sampling: Dict[str, Any], answer: List[int] = (),
            extra: Optional[Dict[str, Any]] = None) -> Row:
        """Join the batch with the conversation `ids` and the `answer` tokens it
        already has (sent to the client before the hand-over): both are the
        prompt here, and at most `max_tokens` - len(answer) more follow."""
        from mlx_lm.sample_utils import make_sampler

        seq = list(ids) + list(answer)
        cache, cached = nearest(self.cache, seq)
        rest = seq[cached:]
        params = tuple(sampling.get(k, 0) or 0 for k in ("temp", "top_p", "min_p", "top_k"))
        sampler = self.samplers.get(params)
        if sampler is None:  # one sampler per setting: rows that share it are sampled in one call
            sampler = self.samplers[params] = make_sampler(temp=params[0], top_p=params[1], min_p=params[2],
                                                           top_k=params[3])
        (uid,) = self.gen.insert([rest], max_tokens=[max(max_tokens - len(answer), 1)],
                                 caches=[cache] if cache is not None else None,
                                 all_tokens=[seq[:cached]], samplers=[sampler])
        if self.drafter is not None:
            self.drafter.add(uid, seq, sampling)
        row = Row(job, sink, len(ids), min(cached, len(ids)), len(answer), self.tokenizer.detokenizer, extra or {})
        for t in answer:  # the text already sent: the next piece continues it (its leading space kept)
            row.detokenizer.add_token(t)
        row.detokenizer.last_segment  # noqa: B018  (consumed: it was sent)
        self.rows[uid] = row
        return row

    def step(self, done: Callable[[Row, str], None]) -> None:
        """One batched decoding step: each row's token goes to its sink; rows that
        finish (end token, max_tokens, a stop string) or were cancelled leave."""
        gone = [uid for uid, row in self.rows.items() if row.job.cancelled.is_set()]
        if gone:
            self.gen.remove(gone)
            for uid in gone:
                self._leave(uid, "interrupted", done)
        if not self.rows:
            return
        for r in self.gen.next_generated():
            row = self.rows.get(r.uid)
            if row is None:
                continue
            detok = row.detokenizer
            if r.finish_reason != "stop":
                detok.add_token(r.token)
                row.generated += 1
            if r.finish_reason is not None:
                detok.finalize()
            stopped = row.sink.add(detok.last_segment, final=r.finish_reason is not None)
            if stopped and r.finish_reason is None:
                self.gen.remove([r.uid])
                self._leave(r.uid, "stop", done)
            elif r.finish_reason is not None:
                if r.prompt_cache is not None and r.all_tokens:
                    self.cache.insert_cache(CACHE_KEY, list(r.all_tokens), r.prompt_cache)
                self._leave(r.uid, r.finish_reason, done)
        self.steps += 1

    def _leave(self, uid: int, reason: str, done: Callable[[Row, str], None]) -> None:
        row = self.rows.pop(uid)
        if self.drafter is not None:
            st = self.drafter.rows.pop(uid, None)
            for kind in ("lookup", "heads"):
                if st is not None and st[kind][0]:
                    row.extra[kind] = dict(zip(("steps", "drafted", "accepted"), st[kind]))
        done(row, reason)

    def fail(self, done: Callable[[Row, str], None]) -> None:
        """After an error: every request leaves (each told by `done`), the batch starts empty."""
        for uid in list(self.rows):
            try:
                self.gen.remove([uid])
            except Exception:  # the generator may be the broken part
                pass
            self._leave(uid, "error", done)
        mx.clear_cache()

    def close(self) -> None:
        self.gen.close()


# Drafting inside the batch -------------------------------------------------------------

MAX_BATCH_DRAFT = 8  # the longest draft a row verifies in a batch step
# A verification of n + 1 tokens a row, before it is measured at this batch size: this many
# plain batch steps per extra token, growing with the batch (on this CPU a batch of 8 verifying
# 2 tokens a row costs 1.16 plain steps, 4 tokens 1.77, 6 tokens 2.4).
PRIOR_EXTRA = (0.1, 0.025)  # (base, per row)
MARGIN = 1.05  # a drafting step must promise this much more tokens per second than a plain one
MAX_BATCH_HEAD_DEPTH = 3  # the most head drafts a row verifies in a batch step
# One row's head draft at one depth (the depth's forward and its output projection), as a share of
# the cheapest plain batch step measured, before measured (on this CPU 3-4 ms against a plain
# token's 65 ms).  Rows drafting together share each depth's projection (head_drafts.draft_rows):
# r rows cost (p + r (1 - p)) of one, p the projection's share of the weights a depth reads.
HEAD_ROW_PRIOR = 0.06


def projection_share(kit) -> float:
    """The output projection's share of the weights one depth of the heads reads
    (the rest: the head's own layer), as parameter counts."""
    from mlx.utils import tree_flatten

    layer = sum(v.size for _, v in tree_flatten(kit.heads[0].parameters()))
    ids = kit.draft_ids
    proj = (ids.size if ids is not None else kit.backbone.vocab_size) * kit.backbone.hidden_size
    return proj / (proj + layer)


class RowHeads(HiddenHistory):
    """A row's heads in the running batch: the backbone's hidden states from
    where the row's cache began (its prompt's, handed over by the prefill:
    capturing_prompts; a kept conversation's prefix was cached without them, so
    the heads start after it, head_drafts.catch_up), its depth caches, and the
    tokens its backbone cache holds.  `kit`: a DraftState whose heads,
    projection and entry it shares."""

    def __init__(self, kit, tokens: List[int]):
        from .depths import DepthCaches

        for name in ("backbone", "heads", "project", "draft_ids", "entry", "feedback_post", "max_depth"):
            setattr(self, name, getattr(kit, name))
        self.tokens = list(tokens)
        self.length = len(self.tokens)
        self.hist, self.hist_pos, self.hist_base = [], [], self.length
        self.depths = DepthCaches(self.max_depth, base=self.length)

    def ready(self) -> bool:
        """Whether depth 1 has the hidden state it drafts from (the last cached position's)."""
        return self.length > self.hist_base

    def kept(self, tokens: List[int], hidden: mx.array) -> None:
        """The backbone cached `tokens` (their hidden states, lazily) after what it held."""
        self.push_hidden(hidden)
        self.length += len(tokens)
        self.tokens.extend(tokens)


class BatchDrafter:
    """Per-row suffix indexes, heads and samplers, and the planner of the batch's steps."""

    def __init__(self, max_draft: int = MAX_BATCH_DRAFT, model=None, head_set=None, lookup: bool = True):
        from .planner import DraftPlanner

        self.max_draft = max_draft
        self.lookup = lookup
        self.acceptance = DraftPlanner("auto", "prompt-lookup")  # lookup acceptance by match length
        self.rows: Dict[int, Dict[str, Any]] = {}
        self.plain_cost: Dict[int, float] = {}  # batch size -> seconds per plain step
        self.draft_cost: Dict[tuple, float] = {}  # (batch size, tokens a row) -> seconds per verification
        self.head_cost: Optional[float] = None  # seconds of one row's head draft, per depth
        self.head_shared = 0.0  # the projection's share of a depth's weights, read once for all rows
        self.steps = {"plain": 0, "lookup": 0, "heads": 0}
        self.head_set = head_set
        self.kit = None  # the heads, their projection and entry, shared by the rows (its caches unused)
        self.head_acceptance: Dict[float, Any] = {}  # temperature -> DraftPlanner: AR by position, measured
        if head_set is not None and model is not None:
            from .costs import head_acceptance
            from .engine import DraftState

            self.kit = DraftState(model, head_set, MAX_BATCH_HEAD_DEPTH)
            self._head_prior = head_acceptance(getattr(head_set, "path", None), head_set.config.get("loop"))
            self.head_shared = projection_share(self.kit)

    def add(self, uid: int, context: List[int], sampling: Dict[str, Any]) -> None:
        from .engine import make_logprobs_transform
        from .suffix import SuffixIndex

        temp = float(sampling.get("temp", 0.0) or 0.0)
        opts = (sampling.get("top_p", 0.0), sampling.get("top_k", 0), sampling.get("min_p", 0.0))
        transform = make_logprobs_transform(temp, *opts)
        self.rows[uid] = {"index": SuffixIndex(context), "transform": transform, "match": 0, "temp": temp,
                          "lookup": [0, 0, 0], "heads": [0, 0, 0], "own": None,
                          # the heads draw sampled drafts at their own temperature (HeadSet.draft_temperature)
                          "q": (make_logprobs_transform(self.head_set.draft_temperature(temp), *opts)
                                if self.head_set is not None and temp > 0 else None)}

    def _acc(self, temp: float):
        """The heads' acceptance by position at this temperature (a planner's counts,
        started from the head set's evaluation)."""
        from .costs import seed_acceptance
        from .planner import DraftPlanner

        key = round(temp, 2)
        acc = self.head_acceptance.get(key)
        if acc is None:
            acc = self.head_acceptance[key] = seed_acceptance(
                DraftPlanner("auto", "heads", max_draft=MAX_BATCH_HEAD_DEPTH), self._head_prior)
            acc.set_temp(temp)
        return acc

    def row_heads(self, uid: int, tokens: List[int]) -> Optional[RowHeads]:
        """The row's heads, `tokens` being what its cache holds: started there the
        first time, and again should they ever have missed a forward of the row
        (their hidden states must follow the cache position by position)."""
        row = self.rows.get(uid)
        if row is None or self.kit is None:
            return None
        if row["own"] is None or row["own"].length != len(tokens):
            row["own"] = RowHeads(self.kit, tokens)
        return row["own"]

    def _heads_ready(self, uid: int) -> bool:
        row = self.rows.get(uid)
        return row is not None and row["own"] is not None and row["own"].ready()

    def _expected_heads(self, uid: int, d: int) -> float:
        return self._acc(self.rows[uid]["temp"]).expected("heads", d)

    def emitted(self, uid: int, tokens: List[int]) -> None:
        row = self.rows.get(uid)
        if row is not None:
            row["index"].extend(tokens)
            row["match"] = row["index"].match_length()

    def worth_a_look(self, uids: List[int]) -> bool:
        """Whether a draft could pay this step: some row's text ends in a repeat, and
        drafting from every such match as far as it could go would beat plain decoding
        at this batch size (else plain, pipelined: no synchronization to ask)."""
        matches = [self.rows[u]["match"] if u in self.rows and self.lookup else 0 for u in uids]
        b = len(uids)
        plain_rate = b / self._cost(b, 1) * MARGIN
        if any(m >= 2 for m in matches):
            for d in range(1, self.max_draft + 1):  # the next token may extend each match by one
                expected = sum(self.acceptance.expected("lookup", d, m + 1) if m >= 2 else 1.0 for m in matches)
                if expected / self._cost(b, d + 1) > plain_rate:
                    return True
        heads = [u for u in uids if self._heads_ready(u)]
        for d in range(1, MAX_BATCH_HEAD_DEPTH + 1) if heads else ():
            expected = b - len(heads) + sum(self._expected_heads(u, d) for u in heads)
            if expected / self._cost(b, d + 1, len(heads), d) > plain_rate:
                return True
        return False

    def _head_rows(self, rows: int) -> float:
        """What `rows` rows drafting together cost at one depth, in one row's drafts."""
        return self.head_shared + rows * (1.0 - self.head_shared) if rows else 0.0

    def _cost(self, b: int, n: int, head_rows: int = 0, depth: int = 0) -> float:
        """Seconds of a batch step of b rows verifying n tokens a row, `head_rows`
        of them first drafting `depth` tokens with the heads."""
        plain = self.plain_cost.get(b)
        if plain is None:
            plain = min(self.plain_cost.values(), default=0.1)
        one = self.head_cost if self.head_cost is not None else \
            HEAD_ROW_PRIOR * min(self.plain_cost.values(), default=0.1)
        extra = depth * self._head_rows(head_rows) * one
        if n == 1:
            return plain + extra
        got = self.draft_cost.get((b, n))
        if got is not None:
            return got + extra
        return plain * (1 + (n - 1) * self._extra_per_token(b)) + extra

    def _extra_per_token(self, b: int) -> float:
        """What each extra token a row adds to a step of b rows, in plain steps: the
        prior's line (PRIOR_EXTRA), scaled to the verifications measured at the
        nearest batch size (rows come and go: every size would otherwise be priced
        by the prior until tried, and this CPU's verifications cost more than it)."""
        base, per_row = PRIOR_EXTRA
        sizes = {bb for bb, nn in self.draft_cost if nn > 1 and bb in self.plain_cost}
        if not sizes:
            return base + per_row * b
        near = min(sizes, key=lambda bb: (abs(bb - b), bb))
        ratios = [(t / self.plain_cost[near] - 1) / (nn - 1) for (bb, nn), t in self.draft_cost.items()
                  if bb == near and nn > 1]
        return (base + per_row * b) / (base + per_row * near) * max(sum(ratios) / len(ratios), 0.0)

    def plan(self, uids: List[int], ys: List[int]) -> Optional[List[Any]]:
        """Each row's draft for this step: tokens from its conversation (maybe
        none) or, as an int d, d head drafts; or None: decode plainly."""
        props = []
        for uid, y in zip(uids, ys):
            row = self.rows.get(uid)
            if row is None or not self.lookup:
                props.append(([], 0))
                continue
            index = row["index"]
            index.extend([y])  # the token this step emits: the draft continues it
            p = index.propose(self.max_draft)
            index.truncate(len(index) - 1)
            props.append((p.tokens, p.match))
        # rows without a proposal may draft with their heads
        heads = [i for i, (t, _) in enumerate(props) if not t and self._heads_ready(uids[i])]
        if not heads and not any(t for t, _ in props):
            return None
        b = len(uids)
        plain_rate = b / self._cost(b, 1)
        best, best_rate = None, plain_rate * MARGIN
        caps = {len(t) for t, _ in props if t} | (set(range(1, MAX_BATCH_HEAD_DEPTH + 1)) if heads else set())
        for cap in sorted(caps):
            looked = sum(self.acceptance.expected("lookup", min(len(t), cap), m) if t else 1.0 for t, m in props)
            longest = max((min(len(t), cap) for t, _ in props if t), default=0)
            options = [(looked, longest, 0)] if longest else []
            if heads:
                dh = min(cap, MAX_BATCH_HEAD_DEPTH)
                gain = sum(self._expected_heads(uids[i], dh) - 1.0 for i in heads)
                options.append((looked + gain, max(longest, dh), dh))
            for expected, n, dh in options:
                rate = expected / self._cost(b, n + 1, len(heads), dh)
                if rate > best_rate:
                    best, best_rate = (cap, dh), rate
        if best is None:
            return None
        cap, dh = best
        return [dh if dh and i in heads else t[:cap] for i, (t, _) in enumerate(props)]

    def observed_plain(self, b: int, seconds: float) -> None:
        old = self.plain_cost.get(b)
        self.plain_cost[b] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def observed_draft(self, b: int, n: int, seconds: float, rows, head_seconds: float = 0.0,
                       typical: bool = True) -> None:
        """rows: (uid, kind, drafted, accepted, match) of this step; `head_seconds`:
        the part spent drafting with the heads (the rest is the verification's), a
        typical head cost unless some depth first caught up on many positions."""
        old = self.draft_cost.get((b, n))
        verify = max(seconds - head_seconds, 0.0)
        self.draft_cost[(b, n)] = verify if old is None else 0.8 * old + 0.2 * verify
        drafting = [d for _, kind, d, _, _ in rows if kind == "heads"]
        if drafting and typical:
            per = head_seconds / (max(drafting) * self._head_rows(len(drafting)))
            self.head_cost = per if self.head_cost is None else 0.8 * self.head_cost + 0.2 * per
        self.steps["heads" if drafting else "lookup"] += 1
        for uid, kind, d, a, m in rows:
            row = self.rows.get(uid)
            if not d or row is None:
                continue
            if kind == "heads":
                self._acc(row["temp"]).observe("heads", d, a, None)
            else:
                self.acceptance.observe("lookup", d, a, None, m)
            counts = row[kind]
            counts[0] += 1
            counts[1] += d
            counts[2] += a


def drop_tails(caches, drop: List[int]) -> None:
    """Batch caches (mlx-lm's BatchKVCache) whose row i drops its last `drop[i]`
    positions, so that every row ends at the same column again: what all rows
    drop is trimmed (no copy), and rows that drop more move right by the
    difference (one gather over the columns in use), their left padding growing
    by as much.  mlx-lm's own way (prepare(right_padding) + finalize) rolls the
    whole buffers, their unused capacity too, even when every row drops the
    same.  Measured inside drafting steps of the default model (greedy, the
    heads drafting one token a row): 9.6 -> 2.7 ms at 1 row, 14.5 -> 2.6 ms at
    2 rows dropping alike (15.0 -> 13.0 otherwise), 25.1 -> 1.7 ms at 4 rows
    dropping alike (27.6 -> 23.8 otherwise), of 80-145 ms steps."""
    low = min(drop)
    shift = [x - low for x in drop]
    for c in caches:
        if low:
            c.trim(low)
        if not any(shift):
            continue
        idx = c._idx
        moved = mx.array(shift)
        # row i's column j takes its column j - shift[i] (the first shift[i] become padding)
        src = mx.maximum(mx.arange(idx)[None, :] - moved[:, None], 0)[:, None, :, None]
        for name in ("keys", "values"):
            buf = getattr(c, name)
            buf[:, :, :idx] = mx.take_along_axis(buf[:, :, :idx], src, axis=2)
        c.offset = c.offset - moved
        c.left_padding = c.left_padding + moved


def capturing_prompts(model, sampler, drafter: BatchDrafter, prefill_step_size: int):
    """An empty mlx-lm PromptProcessingBatch whose prefill hands each row's
    hidden states to its heads (RowHeads, started where the row's cache began:
    after a kept conversation's prefix, or at 0), so that a row's heads draft
    with its prompt's context, as the single-request loop's do."""
    from mlx_lm.generate import PromptProcessingBatch

    class CapturingPrompts(PromptProcessingBatch):
        def prompt(self, tokens):
            if not tokens:
                return super().prompt(tokens)
            uids, before = list(self.uids), [list(t) for t in self.tokens]
            caught, real = [], self.model

            def forward(x, cache=None):  # each prefill chunk's hidden states (B x chunk)
                out = real(x, cache=cache)
                caught.append(drafter.kit.backbone.captured())
                return out

            self.model = forward
            try:
                super().prompt(tokens)
            finally:
                self.model = real
            hidden = caught[0] if len(caught) == 1 else mx.concatenate(caught, axis=1)
            mx.eval(hidden)
            for i, uid in enumerate(uids):
                own = drafter.row_heads(uid, before[i])
                if own is not None:
                    own.kept(tokens[i], hidden[i, : len(tokens[i])])

        def generate(self, tokens):
            gen = super().generate(tokens)
            if gen.uids:  # mlx-lm's GenerationBatch ran its first step: the rows' last prompt tokens
                hidden = drafter.kit.backbone.captured()
                for i, uid in enumerate(gen.uids):
                    own = drafter.row_heads(uid, gen.tokens[i][:-1])
                    if own is not None:
                        own.kept(gen.tokens[i][-1:], hidden[i])
            return gen

    return CapturingPrompts.empty(model, sampler, prefill_step_size=prefill_step_size)


def drafting_generation(model, sampler, drafter: BatchDrafter):
    """An empty mlx-lm GenerationBatch whose steps draft (BatchGenerator extends it with
    every request that finishes its prompt)."""
    from mlx_lm.generate import GenerationBatch

    class DraftingGeneration(GenerationBatch):
        def next(self):
            if not self.uids:
                return []
            if self._draftable() and drafter.worth_a_look(self.uids):
                mx.eval(self._next_tokens)
                ys = self._next_tokens.tolist()
                drafts = drafter.plan(self.uids, ys)
                if drafts is not None:
                    return self._draft_step(ys, drafts)
                self._after_draft = True  # the forward below starts after a synchronization
            tic = time.perf_counter()
            out = super().next()  # (our _step: the hidden states kept for the heads)
            seconds = time.perf_counter() - tic
            drafter.steps["plain"] += 1
            if not getattr(self, "_after_draft", False):  # a pipelined step's wall time
                drafter.observed_plain(len(out), seconds)
            self._after_draft = False
            for r in out:
                drafter.emitted(r.uid, [r.token])
            return out

        def _step(self):
            if drafter.kit is None:
                return super()._step()
            uids = list(self.uids)
            out = super()._step()
            hidden = drafter.kit.backbone.captured()  # of the forward that just ran (lazy, B x 1)
            for i, uid in enumerate(uids):
                own = drafter.row_heads(uid, self.tokens[i][:-1])
                if own is not None:
                    own.kept(self.tokens[i][-1:], hidden[i])
            return out

        def _draftable(self) -> bool:
            from mlx_lm.models.cache import BatchKVCache

            return all(type(c) is BatchKVCache for c in self.prompt_cache) and not any(self.logits_processors)

        def _head_drafts(self, ys: List[int], drafts: List[Any]):
            """The rows' head drafts (where `drafts` gives a depth), built and evaluated
            together: ({row: (draft tokens, q or None, the depths' streams)}, whether
            no depth first caught up on more than a step's worth of positions)."""
            from . import head_drafts

            rows, typical = {}, True
            for i, d in enumerate(drafts):
                if isinstance(d, int) and not isinstance(d, bool):
                    own = rows[i] = drafter.row_heads(self.uids[i], self.tokens[i])
                    # after plain steps the depths first catch up on what they missed: not a typical cost
                    typical = typical and all(lag <= d + 2 for lag in own.depths.lags(own.length)[:d])
                    own.tokens.append(ys[i])  # t_n, which depth 1 drafts after (read as the graph is built)
            built = {}
            if rows:  # one depth for all (the plan's): each depth's projection is one product for the rows
                d = drafts[next(iter(rows))]
                made = head_drafts.draft_rows(list(rows.values()), d,
                                              [drafter.rows[self.uids[i]]["q"] for i in rows])
                for (i, own), (toks, qs, streams, _) in zip(rows.items(), made):
                    own.tokens.pop()
                    built[i] = (mx.stack(toks), mx.stack(qs) if qs else None, streams)
            mx.eval([x for t, q, _ in built.values() for x in (t, q) if x is not None])
            return built, typical

        def _draft_step(self, ys: List[int], drafts: List[Any]):
            from .engine import accept_sampled, accept_verbatim

            tic = time.perf_counter()
            built, typical = self._head_drafts(ys, drafts)
            head_seconds = time.perf_counter() - tic
            drafts = [built[i][0].tolist() if i in built else d for i, d in enumerate(drafts)]
            b = len(self.uids)
            n = 1 + max(len(d) for d in drafts)
            rows = [[y] + d + [0] * (n - 1 - len(d)) for y, d in zip(ys, drafts)]
            logits = self.model(mx.array(rows), cache=self.prompt_cache).astype(mx.float32)
            hidden = drafter.kit.backbone.captured() if drafter.kit is not None else None
            counts, nexts = [], []  # per row: drafts accepted, the token after each accepted prefix
            for i, (uid, d) in enumerate(zip(self.uids, drafts)):
                row = drafter.rows.get(uid)
                transform = row["transform"] if row is not None else None
                if i in built and transform is not None:  # sampled head drafts: their own q
                    a, tokens = accept_sampled(built[i][0], built[i][1], transform(logits[i, : len(d) + 1]))
                else:
                    a, tokens = accept_verbatim(mx.array(d, mx.uint32), logits[i, : len(d) + 1], transform)
                counts.append(a)
                nexts.append(tokens)
            mx.eval(counts, nexts)
            accepted = [int(a) for a in counts]
            lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            responses, keep, kept = [], [], []
            observed = []
            for i, (uid, d) in enumerate(zip(self.uids, drafts)):
                a = accepted[i]
                out = [ys[i]] + d[:a]
                finish, used = None, 0
                for t in out:
                    used += 1
                    self._num_tokens[i] += 1
                    if self._num_tokens[i] >= self.max_tokens[i]:
                        finish = "length"
                    if self._matchers[i].advance(t):
                        finish = "stop"
                    if finish is not None:
                        break
                out = out[:used]
                kept.append(used)
                observed.append((uid, "heads" if i in built else "lookup", len(d), a,
                                 drafter.rows[uid]["match"] if uid in drafter.rows else 0))
                responses.append((i, out, finish))
                own = drafter.row_heads(uid, self.tokens[i]) if finish is None and hidden is not None else None
                if own is not None:  # the heads keep what the backbone keeps
                    pos = own.length
                    own.kept(out, hidden[i, :used])
                    if i in built:
                        own.depths.rollback(len(d), a, pos, built[i][2])
            # each row keeps the positions of the tokens it emitted; the rest go to its left padding
            drop_tails(self.prompt_cache, [n - k for k in kept])
            nxt = [int(tokens[a].item()) for tokens, a in zip(nexts, accepted)]
            result = []
            for (i, out, finish), uid in zip(responses, list(self.uids)):
                self.tokens[i].extend(out)
                drafter.emitted(uid, out)
                for j, t in enumerate(out):
                    last = j == len(out) - 1
                    result.append(self.Response(  # each token with the distribution it was drawn from
                        uid=uid, token=t, logprobs=self._next_logprobs[i] if j == 0 else lp[i, j - 1],
                        finish_reason=finish if last else None,
                        prompt_cache=self.extract_cache(i) if last and finish else None,
                        all_tokens=self.tokens[i] if last and finish else None))
                if finish is None:
                    keep.append(i)
            self._next_tokens = mx.array(nxt, dtype=mx.uint32)
            self._next_logprobs = [lp[i, accepted[i]] for i in range(b)]
            self._after_draft = True
            drafter.observed_draft(b, n, time.perf_counter() - tic, observed, head_seconds, typical)
            if len(keep) < b:
                self.filter(keep)
            return result

    return DraftingGeneration.empty(model, sampler)
