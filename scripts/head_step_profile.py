"""Where a drafting step's time goes in real chat answers, part by part.

Each chat request (the shipped `prompts_chat.jsonl`) is answered to its
end-of-sequence token at a fixed D with the heads (and plainly, with mlx-lm,
for the yardstick); the engine's own per-part timers (SpecStats.parts) split
every drafting step into planning, building the drafts' and the verification's
graph (host), evaluating it (the device, the host waiting) and the rollback
(cache trims, hidden states, suffix index; host).

    python scripts/head_step_profile.py [--num-prompts 6] [--num-draft 1,2,3] [--temp 0.7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import mlx_mtpd  # noqa: F401  (binds OpenBLAS first)
import mlx.core as mx

from mlx_mtpd.bench import CHAT_PROMPTS, _plain, _run
from mlx_mtpd.engine import SpecStats, mtp_generate_step
from mlx_mtpd.prompts import chat_messages as _messages, read_prompts
from mlx_mtpd.utils import load


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-prompts", type=int, default=6)
    ap.add_argument("--num-draft", default="1,2,3")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temp", type=float, default=0.0, help="sampling temperature (both sides, seeded alike)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model, tok, heads = load(None)
    eos = set(tok.eos_token_ids)
    prompts = read_prompts(CHAT_PROMPTS)[: args.num_prompts]
    ids = [mx.array(tok.apply_chat_template(_messages(p), add_generation_prompt=True)) for p in prompts]
    _run(_plain(ids[0], model, 8, 0.0))
    plain_tokens, plain_time = 0, 0.0
    for p in ids:
        mx.random.seed(0)
        toks, _, td = _run(_plain(p, model, args.max_tokens, args.temp), eos)
        plain_tokens += len(toks) - 1
        plain_time += td
    t0 = plain_time / plain_tokens
    out = {"temp": args.temp, "plain_ms_per_token": 1e3 * t0, "by_num_draft": {}}
    print(f"plain mlx-lm: {1e3 * t0:.1f} ms a token ({plain_tokens} tokens)")
    for d in [int(x) for x in args.num_draft.split(",")]:
        total = SpecStats()
        for p in ids:
            st = SpecStats()
            mx.random.seed(0)
            _run(mtp_generate_step(p, model, heads, num_draft=d, max_tokens=args.max_tokens, temp=args.temp,
                                   stats=st), eos)
            total.add(st)
        steps = max(total.rounds, 1)
        parts = {k: 1e3 * v / steps for k, v in total.parts.items()}
        whole = sum(parts.values())
        out["by_num_draft"][d] = {"steps": total.rounds, "tau": total.mean_accepted_length,
                                  "ms_per_step": parts, "step_ms": whole, "step_in_plain_tokens": whole / 1e3 / t0}
        print(f"D={d}: {total.rounds} steps, tau {total.mean_accepted_length:.2f}, a step {whole:.1f} ms "
              f"({whole / 1e3 / t0:.2f} plain tokens): "
              + ", ".join(f"{k} {v:.1f} ms" for k, v in parts.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
