"""One backbone pass per training token: generate the answers and keep, as
they are made, what training needs from the backbone (its hidden states, with
the fused layers' outputs, and the teacher's top-N logits at every position).

Without this, `gen-data` runs the backbone to generate and `train` runs it
again over the same tokens.  Here the prompt's positions come from the batched
prefill and each answer token's from the decoding step that feeds it; the
last token of an answer is never fed, and nothing in training reads its
position (a depth-k prediction at i needs h_i and the teacher at i + k, both
before the last token).

Batches are left-padded through mlx-lm's `BatchKVCache`; rows leave the
batch as they finish and new prompts join it (continuous batching).  Models
whose caches are not plain KV caches (sliding windows, recurrent layers)
generate with mlx-lm's BatchGenerator instead, and their cache is prepared by
a pass at training time.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Tuple

import mlx.core as mx
import numpy as np


def supported(model) -> bool:
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    return all(type(c) is KVCache for c in make_prompt_cache(model))


def _top_n(logits: mx.array, n: int) -> Tuple[mx.array, mx.array]:
    ids = mx.argpartition(-logits, kth=n - 1, axis=-1)[..., :n]
    return ids.astype(mx.int32), mx.take_along_axis(logits, ids, axis=-1).astype(mx.float16)


def generate_captured(model, tokenizer, jobs: List[dict], *, max_tokens: int, batch_size: int, temp: float,
                      seed: int, features: Optional[List[int]], top_n: int, stop=None
                      ) -> Iterator[Tuple[dict, Dict[str, np.ndarray]]]:
    """Yield (gen-data record, captured arrays) per finished answer.  The arrays
    cover the record's sequence (prompt + answer, + the end token if it stopped):
    `hidden` (L, W) float16 (float32 where a value is beyond its range), `top_ids` (L, N)
    int32, `top_logits` (L, N) float16.
    Continuous batching: finished rows leave the batch, and new prompts are
    prefilled and join it once a quarter of it is free.  When `stop()` turns
    true, the answers under way end there (finish_reason "length": a prefix of
    the answer is as good a training text) and no new prompt starts."""
    from mlx_lm.models.cache import BatchKVCache
    from mlx_lm.sample_utils import make_sampler

    from ..heads import Backbone

    bb = Backbone(model, features)
    top_n = min(top_n, bb.vocab_size)
    sampler = make_sampler(temp=temp)
    eos = set(tokenizer.eos_token_ids)
    mx.random.seed(seed)
    prompts = [list(tokenizer.apply_chat_template(j["messages"], add_generation_prompt=True)) for j in jobs]
    pending = sorted(range(len(jobs)), key=lambda i: len(prompts[i]), reverse=True)  # pop(): shortest first
    n_layers = len(bb.inner.layers)
    refill = max(1, batch_size // 4)

    def sample(logits):
        return sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))

    cache, y, live = None, None, []  # live: [job index, answer tokens, captured chunks] per batch row
    while live or (pending and not (stop is not None and stop())):
        if pending and batch_size - len(live) >= min(refill, len(pending)) and not (stop is not None and stop()):
            new = [pending.pop() for _ in range(min(batch_size - len(live), len(pending)))]
            width = max(len(prompts[i]) for i in new)
            pad = [width - len(prompts[i]) for i in new]
            fresh = [BatchKVCache(pad) for _ in range(n_layers)]
            logits, hidden = bb.forward_batch(mx.array([[0] * p + prompts[i] for p, i in zip(pad, new)]), fresh)
            logits = logits.astype(mx.float32)
            ids, vals = _top_n(logits, top_n)
            y_new = sample(logits[:, -1])
            mx.eval(y_new, ids, vals, hidden)
            for r, (p, i) in enumerate(zip(pad, new)):
                live.append([i, [], [(_half(hidden[r, p:]), np.array(ids[r, p:]),
                                      np.array(vals[r, p:]))]])
            if cache is None:
                cache, y = fresh, y_new
            else:
                for c, f in zip(cache, fresh):
                    c.extend(f)
                y = mx.concatenate([y, y_new])
        ys = y.tolist()
        keep = []
        for slot, row in enumerate(live):
            row[1].append(ys[slot])
            if ys[slot] in eos or len(row[1]) >= max_tokens:
                yield _finish(jobs[row[0]], prompts[row[0]], row[1], row[2], tokenizer, eos, top_n)
            else:
                keep.append(slot)
        if len(keep) < len(live):
            live = [live[s] for s in keep]
            if not live:
                cache, y = None, None
                mx.clear_cache()
                continue
            idx = mx.array(keep)
            for c in cache:
                c.filter(idx)
            y = y[idx]
        if stop is not None and stop():
            for row in live:
                yield _finish(jobs[row[0]], prompts[row[0]], row[1], row[2], tokenizer, eos, top_n)
            return
        logits, hidden = bb.forward_batch(y[:, None], cache)
        logits = logits[:, 0].astype(mx.float32)
        ids, vals = _top_n(logits, top_n)
        y = sample(logits)
        mx.eval(y, ids, vals, hidden)
        h, i_np, v_np = _half(hidden[:, 0]), np.array(ids), np.array(vals)
        for slot, row in enumerate(live):
            row[2].append((h[slot : slot + 1], i_np[slot : slot + 1], v_np[slot : slot + 1]))


def _half(x: mx.array) -> np.ndarray:
    """float16, or float32 where a value is beyond float16's range (numpy has no bfloat16)."""
    from .data_cache import HALF_MAX

    return np.array(x.astype(mx.float16 if mx.abs(x).max().item() < HALF_MAX else mx.float32))


def _finish(job, prompt, answer, chunks, tokenizer, eos, top_n):
    stopped = answer[-1] in eos
    completion = answer[:-1] if stopped else answer
    rec = {**job, "messages": job["messages"] + [{"role": "assistant", "content": tokenizer.decode(completion)}],
           "prompt_tokens": prompt, "completion_tokens": completion,
           "finish_reason": "stop" if stopped else "length"}
    hidden = np.concatenate([c[0] for c in chunks])
    ids = np.concatenate([c[1] for c in chunks])
    vals = np.concatenate([c[2] for c in chunks])
    # the sequence is prompt + answer (its end token included); the last token was never fed
    n = len(prompt) + len(answer)
    missing = n - hidden.shape[0]
    hidden = np.concatenate([hidden, np.zeros((missing, hidden.shape[1]), hidden.dtype)])
    ids = np.concatenate([ids, np.zeros((missing, top_n), ids.dtype)])
    vals = np.concatenate([vals, np.full((missing, top_n), -1e4, vals.dtype)])
    return rec, {"hidden": hidden, "top_ids": ids, "top_logits": vals}
