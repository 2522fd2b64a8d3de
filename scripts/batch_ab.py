"""The running batch in-process, paired: mlx-lm's BatchGenerator alone against this
project's Batch (drafting from each conversation; with the heads too; or not
drafting at all), the same requests, rounds alternating the order.

    python scripts/batch_ab.py --requests 16 --batch 8 --rounds 3 --arms lm,draft,heads

No HTTP and no threads: what the batch itself costs, apart from the server's
streaming. Each arm keeps `--batch` rows decoding; a finished request's row is
refilled with the next (as a server with that many clients does). Greedy
answers are compared with mlx-lm's. Reported per arm: decoded tokens per
second (median over the rounds, and each round), the steps by source, the
measured plain and verification step costs by batch size, and the heads'
acceptance in the batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class _Job:
    def __init__(self):
        self.cancelled = threading.Event()


class _Sink:
    def add(self, piece, final=False):
        return False


def run_lm(model, tokenizer, requests, batch, max_tokens, temp):
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_sampler

    gen = BatchGenerator(model, stop_tokens=[[t] for t in tokenizer.eos_token_ids], completion_batch_size=batch,
                         prefill_batch_size=min(batch, 8), sampler=make_sampler(temp=temp))
    pending, answers, live = list(enumerate(requests)), {}, {}

    def insert():
        i, ids = pending.pop(0)
        (uid,) = gen.insert([ids], max_tokens=[max_tokens])
        live[uid] = i
        answers[i] = []

    while pending and len(live) < batch:
        insert()
    tic = time.perf_counter()
    while live:
        for r in gen.next_generated():
            if r.finish_reason != "stop":
                answers[live[r.uid]].append(r.token)
            if r.finish_reason is not None:
                del live[r.uid]
                if pending:
                    insert()
    seconds = time.perf_counter() - tic
    gen.close()
    return answers, seconds, {}


def run_ours(model, tokenizer, requests, batch, max_tokens, temp, draft, heads=None):
    from mlx_mtpd.batching import Batch

    b = Batch(model, tokenizer, batch, draft=draft, heads=heads)
    pending, answers = list(enumerate(requests)), {}

    def add():
        i, ids = pending.pop(0)
        row = b.add(_Job(), _Sink(), ids, max_tokens, {"temp": temp})
        row.extra["index"] = i

    def done(row, reason):
        answers[row.extra["index"]] = list(row.detokenizer.tokens)
        for k, x in row.extra.get("heads", {}).items():
            heads_counts[k] = heads_counts.get(k, 0) + x
        if pending:
            add()

    heads_counts = {}
    while pending and len(b) < batch:
        add()
    tic = time.perf_counter()
    while len(b):
        b.step(done)
    seconds = time.perf_counter() - tic
    d = b.drafter
    info = {} if d is None else {
        "steps": dict(d.steps),
        "plain_ms": {k: round(v * 1e3, 1) for k, v in sorted(d.plain_cost.items())},
        "verify_ms": {f"{k[0]}x{k[1]}": round(v * 1e3, 1) for k, v in sorted(d.draft_cost.items())},
        "head_ms": None if d.head_cost is None else round(d.head_cost * 1e3, 2),
        "heads_rows": heads_counts}
    b.close()
    return answers, seconds, info


class _Tokens:
    """A detokenizer that keeps the token ids (the answers are compared as tokens)."""

    def __init__(self, inner):
        self.inner, self.tokens = inner, []

    def add_token(self, t):
        self.tokens.append(t)
        self.inner.add_token(t)

    def finalize(self):
        self.inner.finalize()

    @property
    def last_segment(self):
        return self.inner.last_segment


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temp", type=float, default=0.0)
    ap.add_argument("--prompts", default="chat")
    ap.add_argument("--arms", default="lm,draft,heads", help="Of lm, draft, heads, plain.")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import mlx_mtpd  # noqa: F401  (binds OpenBLAS before MLX loads)
    import mlx_lm
    from mlx_mtpd.prompts import chat_messages, read_prompts, resolve
    from mlx_mtpd.utils import default_model_path, load_head_set

    path = default_model_path()
    model, tokenizer = mlx_lm.load(str(path))
    head_set = load_head_set(None, None, path, model)
    tokenizer_detok = type(tokenizer).detokenizer

    class Tokenizer(type(tokenizer)):  # each row's detokenizer keeps its token ids
        @property
        def detokenizer(self):
            return _Tokens(tokenizer_detok.fget(self))

    tokenizer.__class__ = Tokenizer
    prompts = read_prompts(resolve(args.prompts))
    ids = [tokenizer.apply_chat_template(chat_messages(p), add_generation_prompt=True) for p in prompts]
    requests = [ids[i % len(ids)] for i in range(args.requests)]
    arms = {
        "lm": lambda: run_lm(model, tokenizer, requests, args.batch, args.max_tokens, args.temp),
        "draft": lambda: run_ours(model, tokenizer, requests, args.batch, args.max_tokens, args.temp, True),
        "heads": lambda: run_ours(model, tokenizer, requests, args.batch, args.max_tokens, args.temp, True, head_set),
        "plain": lambda: run_ours(model, tokenizer, requests, args.batch, args.max_tokens, args.temp, False),
    }
    names = args.arms.split(",")
    out = {name: {"tokens_per_s": [], "info": []} for name in names}
    answers = {}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            got, seconds, info = arms[name]()
            tokens = sum(len(a) for a in got.values())
            out[name]["tokens_per_s"].append(tokens / seconds)
            out[name]["info"].append(info)
            answers.setdefault(name, got)
            print(f"round {r} {name:>6}: {tokens} tokens in {seconds:.1f} s, {tokens / seconds:.1f} tok/s {info}",
                  flush=True)
    for name in names:
        runs = out[name]["tokens_per_s"]
        out[name]["median"] = statistics.median(runs)
        if args.temp == 0 and "lm" in answers and name != "lm":
            out[name]["equal_answers"] = sum(answers[name][i] == answers["lm"][i] for i in answers["lm"])
        print(f"{name:>6}: median {out[name]['median']:.1f} tok/s (rounds: {', '.join(f'{x:.1f}' for x in runs)})"
              + (f", answers equal to mlx-lm's {out[name]['equal_answers']}/{len(requests)}"
                 if "equal_answers" in out[name] else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "arms": out}, indent=2))


if __name__ == "__main__":
    main()
