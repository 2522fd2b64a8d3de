"""Training tokens per CPU-hour, before and after one backbone pass per token.

Before: mlx-lm's BatchGenerator answers the prompts (gen-data without
--cache-into), then a second backbone pass over the same sequences caches the
hidden states and top-N logits (what `train` does first).  After: generation
keeps them as it goes (`capture.py`, gen-data --cache-into).  Same prompts,
same model, same batch size, one process, run back to back; wall time and CPU
time (all threads) of each, and training tokens (answer tokens) per hour.

    python scripts/one_pass_bench.py --prompts mlx_mtpd/data/prompts_pool.jsonl --skip 2000 --num 128 \
        --features 2,15,27 --json bench/one-pass.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import mlx_mtpd  # noqa: F401  (binds OpenBLAS first)


def _timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", default="mlx_mtpd/data/prompts_pool.jsonl")
    ap.add_argument("--skip", type=int, default=2000, help="Start this far into the prompt file.")
    ap.add_argument("--num", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--features", default="2,15,27")
    ap.add_argument("--top-n", type=int, default=256)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from mlx_mtpd.training.capture import generate_captured
    from mlx_mtpd.training.data_cache import TokenSeq, prepare_cache
    from mlx_mtpd.prompts import chat_messages as _messages, read_prompts
    from mlx_mtpd.training.gen_data import generate_answers
    from mlx_mtpd.heads import parse_features
    from mlx_mtpd.utils import load

    features = parse_features(args.features)
    model, tok, _ = load(None)
    prompts = read_prompts(Path(args.prompts))[args.skip : args.skip + args.num]
    jobs = [{"id": str(i), "temp": 0.0, "messages": _messages(p)} for i, p in enumerate(prompts)]
    eos = tok.eos_token_id

    def seqs_of(recs):
        return [TokenSeq(r["prompt_tokens"] + r["completion_tokens"] + ([eos] if r["finish_reason"] == "stop"
                                                                       else []), len(r["prompt_tokens"]), r["id"])
                for r in recs]

    with tempfile.TemporaryDirectory() as d:
        recs, gen_wall, gen_cpu = _timed(lambda: list(generate_answers(model, tok, jobs, args.max_tokens,
                                                                       args.batch_size, 0.0, 0)))
        _, pass_wall, pass_cpu = _timed(lambda: prepare_cache(model, seqs_of(recs), Path(d) / "a", args.top_n,
                                                              features=features, desc="second pass"))
        before_tokens = sum(len(r["completion_tokens"]) for r in recs)

        def captured_run():
            out = list(generate_captured(model, tok, jobs, max_tokens=args.max_tokens, batch_size=args.batch_size,
                                         temp=0.0, seed=0, features=features, top_n=args.top_n))
            caps = {r["id"]: a for r, a in out}
            prepare_cache(model, seqs_of([r for r, _ in out]), Path(d) / "b", args.top_n, features=features,
                          captured=caps, desc="from capture")
            return [r for r, _ in out]

        recs_b, cap_wall, cap_cpu = _timed(captured_run)
        after_tokens = sum(len(r["completion_tokens"]) for r in recs_b)
    same = sum(a["completion_tokens"] == b["completion_tokens"]
               for a, b in zip(sorted(recs, key=lambda r: r["id"]), sorted(recs_b, key=lambda r: r["id"])))
    res = {
        "prompts": len(jobs), "max_tokens": args.max_tokens, "batch_size": args.batch_size, "features": features,
        "before": {"answer_tokens": before_tokens, "generate_s": gen_wall, "generate_cpu_s": gen_cpu,
                   "second_pass_s": pass_wall, "second_pass_cpu_s": pass_cpu,
                   "tokens_per_cpu_hour": before_tokens / (gen_cpu + pass_cpu) * 3600,
                   "tokens_per_hour": before_tokens / (gen_wall + pass_wall) * 3600},
        "after": {"answer_tokens": after_tokens, "generate_and_cache_s": cap_wall, "cpu_s": cap_cpu,
                  "tokens_per_cpu_hour": after_tokens / cap_cpu * 3600,
                  "tokens_per_hour": after_tokens / cap_wall * 3600},
        "identical_answers": same,
    }
    res["ratio_cpu"] = res["after"]["tokens_per_cpu_hour"] / res["before"]["tokens_per_cpu_hour"]
    res["ratio_wall"] = res["after"]["tokens_per_hour"] / res["before"]["tokens_per_hour"]
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
    print(f"training tokens per CPU-hour: {res['before']['tokens_per_cpu_hour']:.0f} -> "
          f"{res['after']['tokens_per_cpu_hour']:.0f} ({res['ratio_cpu']:.2f}x); per hour "
          f"{res['ratio_wall']:.2f}x", file=sys.stderr)


if __name__ == "__main__":
    main()
