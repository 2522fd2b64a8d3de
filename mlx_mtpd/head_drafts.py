"""The MTP heads as a draft source: the cascaded depths drafted in one lazy
graph, and their caches rolled back after verification (docs/DESIGN.md,
"Drafting with cascaded heads")."""

from __future__ import annotations

from typing import List, Optional

import mlx.core as mx


def _concat(a: Optional[mx.array], b: mx.array) -> mx.array:
    return b if a is None or a.shape[0] == 0 else mx.concatenate([a, b], axis=0)


def draft(st, d: int, transform):
    """Build (lazily) the depth calls: drafts d_{n+1..n+d}, their q, each depth's stream."""
    n = len(st.tokens) - 1
    tokens = st.tokens
    drafts: List[mx.array] = []
    qs: List[mx.array] = []
    streams: List[mx.array] = [None] * (d + 1)
    prev_start = st.committed[1]
    prev = st.hidden_range(prev_start, n)
    if st.entry is not None:
        prev = st.entry(prev)
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
        if st.feedback_post:
            out = head.norm(out)
            logits = st.project(out[-1:])[0]
        else:
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
        prev = _concat(st.tail[k], out)
        prev_start = st.tail_start(k)
        streams[k] = prev
    return drafts, qs, streams


def rollback_depths(st, d: int, a: int, n: int, streams) -> None:
    """Depth k keeps its entries whose input token t_{j+k} was accepted: j <= n+a-k."""
    old = list(st.committed)
    new = list(st.committed)
    for k in range(1, d + 1):
        new[k] = min(n, n - k + 1 + a)
        st.depth_cache[k - 1].trim(n - new[k])
    st.committed = new
    for k in range(1, d + 1):
        s = streams[k]  # positions [old tail start of k, n-1]
        lo = st.tail_start(k, new) - st.tail_start(k, old)
        hi = new[k] - st.tail_start(k, old)
        st.tail[k] = s[lo:hi]
