"""Where a batched decoding step of data generation goes, against a prefill pass.

Times one decoding step of the default backbone over a left-padded
`BatchKVCache` (what `gen-data --cache-into` runs) at several batch sizes and
context lengths, its output projection and top-N selection alone, and a
prefill of the same model, each as GFLOP/s of the step's weight matmuls
(2 x parameters per token, plus attention's 4 x context x hidden per layer).

    python scripts/gen_step_profile.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlx_mtpd  # noqa: F401  (binds OpenBLAS first)

sys.path.insert(0, str(Path(__file__).parent))
from step_breakdown import timed  # noqa: E402  (the median of repeated timings)


def main():
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models.cache import BatchKVCache

    from mlx_mtpd.training.capture import _top_n
    from mlx_mtpd.utils import load

    model, _, _ = load(None)
    inner = model.model
    n_layers, hidden = len(inner.layers), inner.embed_tokens.weight.shape[1]
    vocab = inner.embed_tokens.weight.shape[0]
    weights = dict(tree_flatten(model.parameters()))
    params = sum(v.size for k, v in weights.items() if "embed" not in k)
    if not any("lm_head" in k for k in weights):  # a tied output projection: the embedding again
        params += vocab * hidden
    for batch in (64, 128):
        for ctx in (32, 160, 300):
            cache = [BatchKVCache([0] * batch) for _ in range(n_layers)]
            mx.eval(model(mx.random.randint(0, vocab, (batch, ctx)), cache=cache), [c.state[:2] for c in cache])
            y = mx.random.randint(0, vocab, (batch, 1))

            def step(y=y, cache=cache):  # one decoding step, then the cache is trimmed back
                logits = model(y, cache=cache)[:, 0].astype(mx.float32)
                mx.eval(logits, *_top_n(logits, 256))
                for c in cache:
                    c.trim(1)

            t = timed(step, 5)
            x = mx.random.normal((batch, hidden))
            t_head = timed(lambda x=x: mx.eval(inner.embed_tokens.as_linear(x)), 5)
            logits = mx.random.normal((batch, vocab))
            t_top = timed(lambda lg=logits: mx.eval(*_top_n(lg, 256)), 5)
            flops = batch * (2 * params + 4 * ctx * hidden * n_layers)
            print(f"decode batch {batch}, context {ctx}: {t * 1e3:.0f} ms a step ({batch / t:.0f} tokens/s, "
                  f"{flops / t / 1e9:.0f} GFLOP/s); output projection {t_head * 1e3:.0f} ms, "
                  f"top-256 {t_top * 1e3:.0f} ms", flush=True)
    batch, length = 8, 256
    toks = mx.random.randint(0, vocab, (batch, length))
    t = timed(lambda: mx.eval(model(toks, cache=[BatchKVCache([0] * batch) for _ in range(n_layers)])), 3)
    print(f"prefill {batch} x {length}: {t * 1e3:.0f} ms ({batch * length / t:.0f} tokens/s, "
          f"{batch * length * 2 * params / t / 1e9:.0f} GFLOP/s)", flush=True)


if __name__ == "__main__":
    main()
