"""The MTP heads as a draft source: the cascaded depths drafted in one lazy
graph, and their caches rolled back after verification (docs/DESIGN.md,
"Drafting with cascaded heads")."""

from __future__ import annotations

from typing import List, Optional

import mlx.core as mx

from .tree import alternatives


def draft(st, d: int, transform, widths=None):
    """Build (lazily) the depth calls: drafts d_{n+1..n+d}, their q, each depth's
    stream, and with `widths` (candidates per depth, :mod:`mlx_mtpd.tree`) each
    depth's next-best candidates after its draft (None where a depth has none)."""
    n = len(st.tokens) - 1
    tokens = st.tokens
    drafts: List[mx.array] = []
    qs: List[mx.array] = []
    streams: List[mx.array] = [None] * (d + 1)
    alts: List[Optional[mx.array]] = []
    dc = st.depths
    prev_start = dc.committed[1]
    prev = st.hidden_range(prev_start, n)
    if st.entry is not None:
        prev = st.entry(prev)
    for k in range(1, d + 1):
        start = dc.committed[k]
        hid = prev[start - prev_start :]
        true_ids = tokens[start + k : n + 1]
        first_draft = max(start + k, n + 1) - (n + 1)
        parts = []
        if true_ids:
            parts.append(mx.array(true_ids, mx.uint32))
        parts.extend(x.reshape(1).astype(mx.uint32) for x in drafts[first_draft : k - 1])
        tok = parts[0] if len(parts) == 1 else mx.concatenate(parts)
        head = st.heads[k - 1]
        out = head(hid, st.backbone.embed_tokens(tok), dc.caches[k - 1])
        if st.feedback_post:
            out = head.norm(out)
            logits = st.project(out[-1:])[0]
        else:
            logits = st.project(head.norm(out[-1:]))[0]
        if transform is None:
            scores = logits
            choice = mx.argmax(logits)
        else:
            scores = transform(logits)
            choice = mx.random.categorical(scores)
            q = mx.exp(scores)
            if st.draft_ids is not None:
                q = mx.zeros((st.backbone.vocab_size,), q.dtype).at[st.draft_ids].add(q)
            qs.append(q)
        token = st.draft_ids[choice] if st.draft_ids is not None else choice
        drafts.append(token.astype(mx.uint32))
        w = widths[k - 1] if widths is not None and k <= len(widths) else 1
        if w > 1:
            alt = alternatives(scores, choice, w - 1)
            alts.append((st.draft_ids[alt] if st.draft_ids is not None else alt).astype(mx.uint32))
        else:
            alts.append(None)
        prev = dc.stream(k, out)
        prev_start = dc.tail_start(k)
        streams[k] = prev
    return drafts, qs, streams, alts


def catch_up(st, depths: int, reserve: int = 0) -> int:
    """Advance depths 1..`depths` over every position whose inputs are known
    (true tokens only, no drafts), lazily; returns the positions computed.

    Depth k's entry at position j takes (h^{k-1}_j, t_{j+k}): with the tokens
    t_0..t_n known and the backbone's hidden states of positions < st.length,
    depth 1 can reach j = min(st.length, n) - 1 and depth k one position less
    than depth k-1.  Run inside the prefill, this takes the catch-up over a new
    prompt out of the first drafting step (which then costs what any step costs).
    The last `reserve` positions are left to the next drafting step: at a step
    boundary (reserve 1) the newest token's position is the one depth 1 drafts
    from; inside the prefill (reserve 0) the first token is yet to come.
    """
    depths = min(depths, st.max_depth)
    dc = st.depths
    n = len(st.tokens) - 1
    tokens = st.tokens
    old = dc.committed
    new = list(old)
    hi = st.length
    for k in range(1, depths + 1):
        hi = min(hi, n - k + 1 - reserve)
        new[k] = max(old[k], hi)
        hi = new[k]
    if all(new[k] == old[k] for k in range(1, depths + 1)):
        return 0
    work = 0
    prev_start = old[1]
    prev = st.hidden_range(prev_start, new[1]) if new[1] > old[1] else None
    if prev is not None and st.entry is not None:
        prev = st.entry(prev)
    streams: List[Optional[mx.array]] = [None] * (depths + 1)
    for k in range(1, depths + 1):
        lo, top = old[k], new[k]
        out = None
        if top > lo:  # prev covers [prev_start, ...) and starts at old[k]: the next depth's tail start
            hid = prev[lo - prev_start : top - prev_start]
            tok = mx.array(tokens[lo + k : top + k], mx.uint32)
            head = st.heads[k - 1]
            out = head(hid, st.backbone.embed_tokens(tok), dc.caches[k - 1])
            if st.feedback_post:
                out = head.norm(out)
            work += top - lo
        streams[k] = dc.stream(k, out)  # depth k's outputs not yet consumed by depth k+1: [c_{k+1}, c_k)
        prev, prev_start = streams[k], dc.tail_start(k, old)
    dc.advance(new, depths, streams)
    return work
