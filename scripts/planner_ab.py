"""Paired A/B of the `auto` planner: as it is against the planner before the
heads' catch-up was priced and the acceptance prior followed the temperature
(the greedy evaluation's prior at every temperature, weight 12; catch-up free).

Each chat request is answered by plain mlx-lm and by the engine under both
planners, in an order that changes from request to request, so that the
machine's drift falls on all three alike; the ratios are pooled tokens per
second against plain mlx-lm's (cold: a fresh seeded planner per request, as a
new process; warm: one planner per side for the run).

    python scripts/planner_ab.py --temp 0.7 --num-prompts 16 --draft heads [--mode cold]
"""

from __future__ import annotations

import argparse

import mlx_mtpd  # noqa: F401  (binds OpenBLAS first)
import mlx.core as mx

from mlx_mtpd.bench import CHAT_PROMPTS, _plain, _run
from mlx_mtpd.costs import seed_planner
from mlx_mtpd.engine import SpecStats, mtp_generate_step
from mlx_mtpd.planner import MEASURED_PRIOR_WEIGHT, DraftPlanner
from mlx_mtpd.prompts import chat_messages, read_prompts
from mlx_mtpd.utils import load


class Before(DraftPlanner):
    """The planner before: the greedy prior at full weight whatever the temperature,
    and the heads' catch-up after plain decoding not counted."""

    def set_temp(self, temp: float) -> None:
        self.temp = temp
        if self.head_priors:
            self.head_prior, self.head_prior_weight = self.head_priors[0.0], MEASURED_PRIOR_WEIGHT

    def catch_up_cost(self, d, lags) -> float:
        return 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--temp", type=float, default=0.7)
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--draft", default="heads")
    ap.add_argument("--mode", choices=("cold", "warm"), default="cold")
    ap.add_argument("--max-tokens", type=int, default=256)
    args = ap.parse_args()
    model, tok, heads = load(None)
    eos = set(tok.eos_token_ids)

    def planner(cls):
        return seed_planner(cls("auto", args.draft), model, tok, heads)

    classes = {"now": DraftPlanner, "before": Before}
    planners = {k: planner(c) for k, c in classes.items()}
    totals = {k: [0, 0.0] for k in ("plain", "now", "before")}
    stats = {k: SpecStats() for k in classes}
    _run(_plain(mx.array(tok.encode("hello")), model, 4, 0.0))  # warm-up
    orders = (["plain", "now", "before"], ["before", "now", "plain"], ["now", "before", "plain"])
    for i, prompt in enumerate(read_prompts(CHAT_PROMPTS)[: args.num_prompts]):
        ids = mx.array(tok.apply_chat_template(chat_messages(prompt), add_generation_prompt=True))
        for name in orders[i % 3]:
            mx.random.seed(i)
            if name == "plain":
                toks, t, _ = _run(_plain(ids, model, args.max_tokens, args.temp), eos)
            else:
                if args.mode == "cold":
                    planners[name] = planner(classes[name])
                st = SpecStats()
                toks, t, _ = _run(mtp_generate_step(ids, model, heads, num_draft="auto", max_tokens=args.max_tokens,
                                                    temp=args.temp, draft=args.draft, planner=planners[name],
                                                    stats=st), eos)
                stats[name].add(st)
            totals[name][0] += len(toks)
            totals[name][1] += t
        rate = {k: n / s for k, (n, s) in totals.items()}
        print(f"after {i + 1} requests: now {rate['now'] / rate['plain']:.3f}x, "
              f"before {rate['before'] / rate['plain']:.3f}x over plain mlx-lm", flush=True)
    for k in classes:
        print(f"{k}: steps {dict(stats[k].sources)}, tau {stats[k].mean_accepted_length:.2f}")


if __name__ == "__main__":
    main()
