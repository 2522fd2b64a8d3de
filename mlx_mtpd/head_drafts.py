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
    return draft_rows([st], d, [transform], widths)[0]


def draft_rows(sts, d: int, transforms, widths=None):
    """`draft` for several sequences that share the heads (the running batch's
    rows, each with its own tokens, hidden states and depth caches, drafted with
    its own `transforms[i]`): each depth's output projection, the largest
    weight a depth reads, is one matrix product for all of them, not one a row.
    A list of `draft`'s tuples, one per sequence."""
    kit = sts[0]  # the heads, projection, entry and draft vocabulary: the same for every row
    out_rows = []
    prev, prev_start = [], []
    for st in sts:
        start = st.depths.committed[1]
        p = st.hidden_range(start, len(st.tokens) - 1)
        prev.append(kit.entry(p) if kit.entry is not None else p)
        prev_start.append(start)
        out_rows.append(([], [], [None] * (d + 1), []))
    for k in range(1, d + 1):
        head = kit.heads[k - 1]
        feats = []
        for i, st in enumerate(sts):
            dc, n, drafts = st.depths, len(st.tokens) - 1, out_rows[i][0]
            start = dc.committed[k]
            hid = prev[i][start - prev_start[i] :]
            true_ids = st.tokens[start + k : n + 1]
            first_draft = max(start + k, n + 1) - (n + 1)
            parts = [mx.array(true_ids, mx.uint32)] if true_ids else []
            parts.extend(x.reshape(1).astype(mx.uint32) for x in drafts[first_draft : k - 1])
            tok = parts[0] if len(parts) == 1 else mx.concatenate(parts)
            out = head(hid, kit.backbone.embed_tokens(tok), dc.caches[k - 1])
            if kit.feedback_post:
                out = head.norm(out)
                feats.append(out[-1:])
            else:
                feats.append(head.norm(out[-1:]))
            prev[i] = out_rows[i][2][k] = dc.stream(k, out)
            prev_start[i] = dc.tail_start(k)
        logits_all = kit.project(feats[0] if len(feats) == 1 else mx.concatenate(feats))
        w = widths[k - 1] if widths is not None and k <= len(widths) else 1
        for i, (drafts, qs, _, alts) in enumerate(out_rows):
            logits, transform = logits_all[i], transforms[i]
            if transform is None:
                scores = logits
                choice = mx.argmax(logits)
            else:
                scores = transform(logits)
                choice = mx.random.categorical(scores)
                q = mx.exp(scores)
                if kit.draft_ids is not None:
                    q = mx.zeros((kit.backbone.vocab_size,), q.dtype).at[kit.draft_ids].add(q)
                qs.append(q)
            token = kit.draft_ids[choice] if kit.draft_ids is not None else choice
            drafts.append(token.astype(mx.uint32))
            if w > 1:
                alt = alternatives(scores, choice, w - 1)
                alts.append((kit.draft_ids[alt] if kit.draft_ids is not None else alt).astype(mx.uint32))
            else:
                alts.append(None)
    return out_rows


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


class _BranchCache:
    """A depth's KV cache as the branches see it: the entries before the draft
    position (the chain's own entry there excluded), one copy per branch, and
    each branch's new entries after them; the depth's real cache is untouched."""

    def __init__(self, cache, branches: int):
        keep = cache.offset - 1
        self.keys, self.values = (mx.repeat(x[..., :keep, :], branches, axis=0) for x in (cache.keys, cache.values))
        self.offset = keep

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        self.keys = mx.concatenate([self.keys, keys], axis=2)
        self.values = mx.concatenate([self.values, values], axis=2)
        self.offset += keys.shape[2]
        return self.keys, self.values


def fork_drafts(st, alts: mx.array, fork: int, streams, transform):
    """Each of depth 1's alternatives continued for `fork` tokens (lazily): the
    branches run through depths 2..fork+1 together, as a batch, each depth
    reading what its cache holds before the draft position (as the chain's
    draft there did) with the branch's own token in place of the chain's.
    Returns ([(B,) tokens per depth], [(B, vocab) q per depth] or [] when greedy),
    after `draft` drafted the chain (`streams[1]`: depth 1's outputs, its last
    the state every branch starts from)."""
    b = alts.shape[0]
    hid = mx.repeat(streams[1][-1:][None], b, axis=0)  # (B, 1, H)
    tok = alts.reshape(b, 1)
    tokens, qs = [], []
    for k in range(2, fork + 2):
        head = st.heads[k - 1]
        out = head(hid, st.backbone.embed_tokens(tok), _BranchCache(st.depths.caches[k - 1], b))
        if st.feedback_post:
            out = head.norm(out)
            feat = out[:, -1]
        else:
            feat = head.norm(out[:, -1])
        logits = st.project(feat)  # (B, draft vocabulary)
        if transform is None:
            choice = mx.argmax(logits, axis=-1)
        else:
            scores = transform(logits)
            choice = mx.random.categorical(scores)
            q = mx.exp(scores)
            if st.draft_ids is not None:
                q = mx.zeros((b, st.backbone.vocab_size), q.dtype).at[:, st.draft_ids].add(q)
            qs.append(q)
        drafted = (st.draft_ids[choice] if st.draft_ids is not None else choice).astype(mx.uint32)
        tokens.append(drafted)
        hid, tok = out, drafted.reshape(b, 1)
    return tokens, qs
