"""Where a drafting step's time goes, on this machine, for the default model.

For D = 1..4: the backbone forward verifying D+1 tokens, the heads drafting D
tokens (one block call per depth over its catch-up and draft positions, the
reduced-vocabulary projection and argmax), and the whole engine step measured
inside `mtp_generate_step`; host overhead is what the step costs beyond the two
(graph building, .item() syncs, cache trims, Python).  Plain decoding's time per
token (mlx-lm's pipelined generate_step) is the yardstick.  `--verify-lengths`
adds the backbone's time to verify the longer drafts that the suffix index
proposes (model-free, so verification is the whole cost besides host work).

    python scripts/step_breakdown.py [--json out.json] [--verify-lengths 8,16,32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx_mtpd  # noqa: F401  (binds OpenBLAS first)
import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import KVCache, make_prompt_cache, trim_prompt_cache

from mlx_mtpd.engine import SpecStats, mtp_generate_step
from mlx_mtpd.heads import Backbone
from mlx_mtpd.utils import load


def timed(fn, reps=15):
    fn()
    out = []
    for _ in range(reps):
        tic = time.perf_counter()
        fn()
        out.append(time.perf_counter() - tic)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--max-d", type=int, default=4)
    ap.add_argument("--verify-lengths", default="8,16,32")
    args = ap.parse_args()
    model, tok, heads = load(None)
    bb = Backbone(model)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Explain how a bicycle works."}],
                                     add_generation_prompt=True)
    ids = mx.array(prompt)
    cache = make_prompt_cache(model)
    _, hidden = bb.forward(ids, cache)
    mx.eval(hidden)

    n_plain = 64
    tic = time.perf_counter()
    for _ in generate_step(ids, model, max_tokens=n_plain):
        pass
    plain = (time.perf_counter() - tic) / n_plain

    project = bb.projection_rows(heads.draft_ids)
    rows = []
    for d in range(1, args.max_d + 1):
        def verify(d=d):
            logits, h = bb.forward(mx.array(prompt[-d - 1:]), cache)
            mx.eval(mx.argmax(logits, -1), h)
            trim_prompt_cache(cache, d + 1)

        def draft(d=d):
            h = hidden[-2:]
            outs = []
            for k in range(1, d + 1):
                head = heads.head_for_depth(k, "last")
                c = KVCache()
                out = head(h, bb.embed_tokens(mx.array(prompt[-2:])), c)
                outs.append(mx.argmax(project(head.norm(out[-1:]))[0]))
                h = out
            mx.eval(outs)

        t_verify, t_draft = timed(verify), timed(draft)
        st = SpecStats()
        for _ in mtp_generate_step(ids, model, heads, num_draft=d, max_tokens=64, stats=st):
            pass
        step = st.step_time / max(st.forwards, 1)
        rows.append({"num_draft": d, "verify_s": t_verify, "draft_s": t_draft, "step_s": step,
                     "host_s": max(step - t_verify - t_draft, 0.0), "tau": st.mean_accepted_length,
                     "tokens_per_s": st.emitted / max(st.step_time, 1e-9),
                     "step_over_plain_token": step / plain})
    long_rows = []
    for d in [int(x) for x in args.verify_lengths.split(",") if x.strip()]:
        def verify_long(d=d):
            logits = model(mx.array(prompt[-d - 1:])[None], cache=cache)
            mx.eval(mx.argmax(logits, -1))
            trim_prompt_cache(cache, d + 1)

        t = timed(verify_long, reps=7)
        long_rows.append({"num_draft": d, "verify_s": t, "verify_over_plain_token": t / plain})
    print(f"plain decoding: {plain * 1e3:.1f} ms/token ({1 / plain:.1f} tokens/s)")
    for r in long_rows:
        print(f"model-free draft of {r['num_draft']}: verify {r['verify_s'] * 1e3:.1f} ms "
              f"= {r['verify_over_plain_token']:.2f} plain tokens")
    print("D  verify(D+1) ms  draft(D) ms  host ms  step ms  step/plain  tau   break-even tau")
    for r in rows:
        print(f"{r['num_draft']}  {r['verify_s'] * 1e3:14.1f}  {r['draft_s'] * 1e3:11.1f}  {r['host_s'] * 1e3:7.1f}"
              f"  {r['step_s'] * 1e3:7.1f}  {r['step_over_plain_token']:10.2f}  {r['tau']:4.2f}"
              f"  {r['step_over_plain_token']:14.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"plain_s_per_token": plain, "device": str(mx.default_device()), "by_num_draft": rows,
                       "long_verify": long_rows}, f, indent=2)


if __name__ == "__main__":
    main()
