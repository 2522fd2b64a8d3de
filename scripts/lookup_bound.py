"""How far drafting from the conversation can go on the edit/repeat conversations.

For each conversation of `mlx_mtpd bench --prompts edits`, plain mlx-lm
decoding gives the greedy answer and its time; this engine (`auto`,
heads+lookup, one planner for the run, as in a chat) gives its own time.  Then
an *oracle* replays each answer with the engine's own suffix index and the step
costs its planner measured in the same run: before every step it knows how
many tokens of the proposal will be accepted, verifies exactly those (when
that beats a plain token) and otherwise decodes one token plainly, or, in the
second bound, at the heads' measured tokens per second.  No real policy can do
better than the oracle with the same index and costs, so it bounds what a
better planner could gain here; the rest would need the model to repeat more,
better heads, or cheaper verification.

    python scripts/lookup_bound.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlx_mtpd  # noqa: F401  (binds OpenBLAS first)
import mlx.core as mx

from mlx_mtpd.bench import EDITS_PROMPTS, _plain, _run
from mlx_mtpd.engine import DraftPlanner, SpecStats, mtp_generate_step
from mlx_mtpd.prompts import chat_messages as _messages, read_prompts
from mlx_mtpd.suffix import MAX_LOOKUP_DRAFT, SuffixIndex
from mlx_mtpd.utils import load


def oracle_seconds(prompt, answer, planner: DraftPlanner, token_cost: float) -> float:
    """Decode time of `answer` when every step knows its outcome in advance."""
    index = SuffixIndex(prompt)
    i, total = 0, 0.0
    while i < len(answer):
        p = index.propose(MAX_LOOKUP_DRAFT)
        k = 0
        while k < len(p) and i + k < len(answer) and p.tokens[k] == answer[i + k]:
            k += 1
        n = min(k + 1, len(answer) - i)
        step = planner.step_cost("lookup", k) if k else None
        if step is not None and n / step > 1.0 / token_cost:
            total += step
        else:
            n, total = 1, total + token_cost
        index.extend(answer[i : i + n])
        i += n
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model, tok, heads = load(None, None)
    convs = read_prompts(EDITS_PROMPTS)
    eos = set(getattr(tok, "eos_token_ids", None) or [tok.eos_token_id])
    planner = DraftPlanner("auto", "heads+lookup")
    _run(_plain(mx.array([1, 2, 3]), model, 4, 0.0))  # warm-up
    rows = []
    for i, conv in enumerate(convs):
        ids = tok.apply_chat_template(_messages(conv), add_generation_prompt=True)
        answer, t_plain, td_plain = _run(_plain(mx.array(ids), model, args.max_tokens, 0.0), eos)
        st = SpecStats()
        got, t_eng, td_eng = _run(mtp_generate_step(mx.array(ids), model, heads, num_draft="auto",
                                                    draft="heads+lookup", max_tokens=args.max_tokens, stats=st,
                                                    planner=planner), eos)
        assert got == answer, f"conversation {i}: the engine's greedy answer differs from plain decoding"
        rows.append({"conversation": i, "prompt": ids, "answer": answer, "tokens": len(answer),
                     "plain_s": t_plain, "plain_decode_s": td_plain, "engine_s": t_eng,
                     "engine_decode_s": td_eng, "sources": st.sources})
        print(f"{i}: {len(answer)} tokens, plain {td_plain:.2f} s, engine {td_eng:.2f} s, {st.sources}", flush=True)
    t0 = planner.cost[("plain", 0)]
    heads_rate, heads_d = planner._best_length("heads", planner.num_draft) if heads is not None else (0.0, 0)
    heads_token = min(t0, 1.0 / heads_rate) if heads_rate else t0
    plain_dec = sum(r["plain_decode_s"] for r in rows)
    plain_tot = sum(r["plain_s"] for r in rows)
    eng_dec = sum(r["engine_decode_s"] for r in rows)
    eng_tot = sum(r["engine_s"] for r in rows)
    prefill = eng_tot - eng_dec  # prompt and first token: the same for any policy
    # the oracle's costs are the planner's, which may differ from plain mlx-lm's a little:
    # scale them to plain decoding's measured time per token
    scale = plain_dec / max(sum(r["tokens"] - 1 for r in rows), 1) / t0
    bounds = {}
    for name, token_cost in (("lookup oracle, plain elsewhere", t0), ("lookup oracle, heads elsewhere", heads_token)):
        dec = scale * sum(oracle_seconds(r["prompt"] + r["answer"][:1], r["answer"][1:], planner, token_cost)
                          for r in rows)
        bounds[name] = {"decode_speedup": plain_dec / dec, "speedup": plain_tot / (prefill + dec)}
    res = {
        "plain_ms_per_token": 1e3 * t0, "heads_best_d": heads_d, "heads_tokens_per_s": heads_rate,
        "lookup_step_ms": {d: 1e3 * planner.step_cost("lookup", d) for d in (1, 4, 8, 16, 32)},
        "engine": {"decode_speedup": plain_dec / eng_dec, "speedup": plain_tot / eng_tot},
        "bounds": bounds,
        "conversations": [{k: v for k, v in r.items() if k not in ("prompt", "answer")} for r in rows],
    }
    print(f"\nplain decoding {1e3 * t0:.1f} ms/token; lookup steps (ms) {res['lookup_step_ms']}; "
          f"heads D={heads_d}: {heads_rate:.1f} tokens/s")
    print(f"{'':34s} decode speedup   speedup (with the prompt)")
    print(f"{'this engine':34s} {res['engine']['decode_speedup']:10.2f}x   {res['engine']['speedup']:10.2f}x")
    for name, b in bounds.items():
        print(f"{name:34s} {b['decode_speedup']:10.2f}x   {b['speedup']:10.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
