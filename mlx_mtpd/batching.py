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

Inside the batch every request decodes plainly (one token a step): on this
CPU a batch of 8 verifies no faster than it decodes, so drafting in it would
cost.  A request alone is served by the speculative loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import mlx.core as mx

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


def nearest(kept, ids: List[int]):
    """(caches, n): the kept caches holding the longest prefix of `ids` (at most all
    but its last token, so a forward remains), or (None, 0)."""
    from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

    cache, rest = kept.fetch_nearest_cache(CACHE_KEY, list(ids))
    if cache is None:
        return None, 0
    if not rest:  # the whole sequence is cached: feed its last token again
        if not can_trim_prompt_cache(cache):
            return None, 0
        trim_prompt_cache(cache, 1)
        rest = ids[-1:]
    return cache, len(ids) - len(rest)


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

    def __init__(self, model, tokenizer, max_batch: int = 8, cache=None):
        from mlx_lm.generate import BatchGenerator

        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        eos = list(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
        self.gen = BatchGenerator(model, stop_tokens=[[t] for t in eos], completion_batch_size=max_batch,
                                  prefill_batch_size=min(max_batch, 8))
        self.cache = cache if cache is not None else kept_caches()  # shared with the server's other path
        self.rows: Dict[int, Row] = {}
        self.steps = 0

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
        sampler = make_sampler(temp=sampling.get("temp", 0.0), top_p=sampling.get("top_p", 0.0),
                               min_p=sampling.get("min_p", 0.0), top_k=sampling.get("top_k", 0))
        (uid,) = self.gen.insert([rest], max_tokens=[max(max_tokens - len(answer), 1)],
                                 caches=[cache] if cache is not None else None,
                                 all_tokens=[seq[:cached]], samplers=[sampler])
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
                done(self.rows.pop(uid), "interrupted")
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
                done(self.rows.pop(r.uid), "stop")
            elif r.finish_reason is not None:
                if r.prompt_cache is not None and r.all_tokens:
                    self.cache.insert_cache(CACHE_KEY, list(r.all_tokens), r.prompt_cache)
                done(self.rows.pop(r.uid), r.finish_reason)
        self.steps += 1

    def fail(self, done: Callable[[Row, str], None]) -> None:
        """After an error: every request leaves (each told by `done`), the batch starts empty."""
        for uid in list(self.rows):
            try:
                self.gen.remove([uid])
            except Exception:  # the generator may be the broken part
                pass
            done(self.rows.pop(uid), "error")
        mx.clear_cache()

    def close(self) -> None:
        self.gen.close()
