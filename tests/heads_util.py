"""Test helpers: heads with real acceptance, made without training.

`fit_heads` self-distils in closed form: head k's decoder block is made an
identity (its attention and MLP outputs zeroed) and W_k is a ridge regression
from [RMSNorm(Emb(t_{j+k})) ; RMSNorm(h^{k-1}_j)] to the backbone's own next
hidden state, fitted on the backbone's own greedy text.  Acceptance is then far
from 0 on that text and lower elsewhere, so accept and reject paths both run.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_mtpd.heads import Backbone, init_heads


def fit_heads(model, seqs, num_heads=2, ridge=1e-2, loop="last", draft_vocab=None):
    bb = Backbone(model)
    hs = init_heads(model, num_heads, loop=loop, draft_vocab=draft_vocab)
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
        x = mx.concatenate([head.enorm(e[1:]), head.hnorm(h[:-1])], axis=-1)
        X.append(np.array(x[:-1].astype(mx.float32)))
        Y.append(np.array(h[1:-1].astype(mx.float32)))
    X, Y = np.concatenate(X), np.concatenate(Y)
    W = np.linalg.solve(X.T @ X + ridge * np.eye(X.shape[1]), X.T @ Y).T
    dtype = head.eh_proj.weight.dtype
    for head in hs.heads:
        head.eh_proj.weight = mx.array(W.astype(np.float32)).astype(dtype)
    mx.eval(hs.parameters())
    return hs
