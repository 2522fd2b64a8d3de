"""Test helpers: heads with real acceptance, made without training.

`fit_heads` self-distils in closed form: head k's decoder block is made an
identity (its attention and MLP outputs zeroed) and W_k is a ridge regression
from [RMSNorm(Emb(t_{j+k})) ; RMSNorm(h^{k-1}_j)] to the backbone's own next
hidden state, fitted on the backbone's own greedy text.  Acceptance is then far
from 0 on that text and lower elsewhere, so accept and reject paths both run.

With `features`, the heads fuse those layers' outputs: the fusion's
projection is the pass-through plus a random mix of the features, so drafts
depend on every fused layer, and W is fitted on the fusion's output.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_mtpd.heads import Backbone, init_heads


def fit_heads(model, seqs, num_heads=2, ridge=1e-2, loop="last", draft_vocab=None, features=None):
    bb = Backbone(model, features)
    hs = init_heads(model, num_heads, loop=loop, draft_vocab=draft_vocab, features=features)
    if features:
        w = hs.fuse.proj.weight
        mix = mx.random.normal(w.shape, key=mx.random.key(len(features))) * 0.3
        n = bb.hidden_size
        hs.fuse.proj.weight = w + mx.concatenate([mix[:, :-n], mx.zeros_like(mix[:, -n:])], axis=1).astype(w.dtype)
    entry = hs.entry_hidden(bb) or (lambda x: x)
    for head in hs.heads:
        for name, mod in head.block.named_modules():
            if name.endswith(("o_proj", "down_proj")) and hasattr(mod, "weight"):
                mod.weight = mx.zeros_like(mod.weight)
        head.norm.weight = bb.norm.weight
    X, Y = [], []
    head = hs.heads[0]
    for s in seqs:
        _, h = bb.forward(mx.array(s), None)
        e = bb.embed_tokens(mx.array(s))
        x = mx.concatenate([head.enorm(e[1:]), head.hnorm(entry(h[:-1]))], axis=-1)
        X.append(np.array(x[:-1].astype(mx.float32)))
        Y.append(np.array(bb.last_state(h[1:-1]).astype(mx.float32)))
    X, Y = np.concatenate(X), np.concatenate(Y)
    W = np.linalg.solve(X.T @ X + ridge * np.eye(X.shape[1]), X.T @ Y).T
    dtype = head.eh_proj.weight.dtype
    for head in hs.heads:
        head.eh_proj.weight = mx.array(W.astype(np.float32)).astype(dtype)
    mx.eval(hs.parameters())
    return hs
