"""`stream_generate`, mirroring mlx-lm's: text streamed as the loop accepts
tokens, with the acceptance statistics so far (`mlx_mtpd.generate` re-exports
it beside `generate`; a chat session streams through it too)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Generator, List, Optional, Union

import mlx.core as mx
import mlx.nn as nn

from .engine import SpecStats, mtp_generate_step, parse_num_draft
from .errors import MTPDError
from .heads import HeadSet

DEFAULT_NUM_DRAFT = "auto"


@dataclass
class GenerationResponse:
    """mlx-lm's GenerationResponse plus the acceptance statistics so far."""

    text: str
    token: int
    logprobs: mx.array
    from_draft: bool
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: Optional[str] = None
    stats: Optional[SpecStats] = None


def encode_prompt(tokenizer, prompt) -> mx.array:
    if isinstance(prompt, mx.array):
        return prompt
    if isinstance(prompt, str):
        if not prompt:
            raise MTPDError("the prompt is empty: give some text")
        add_special = tokenizer.bos_token is None or not prompt.startswith(tokenizer.bos_token)
        prompt = tokenizer.encode(prompt, add_special_tokens=add_special)
    if len(prompt) == 0:
        raise MTPDError("the prompt is empty: give at least one token")
    return mx.array(prompt)


def stream_generate(
    model: nn.Module,
    tokenizer,
    prompt: Union[str, mx.array, List[int]],
    max_tokens: int = 256,
    heads: Optional[HeadSet] = None,
    num_draft: Union[int, str, None] = None,
    **kwargs,
) -> Generator[GenerationResponse, None, None]:
    """Stream text like `mlx_lm.stream_generate`, drafting with MTP heads.

    Stop conditions, EOS and streaming detokenization are mlx-lm's.  Extra
    keyword arguments go to :func:`mlx_mtpd.engine.mtp_generate_step`
    (`draft`, `loop`, `temp`, `top_p`, `top_k`, `min_p`, `prefill_step_size`,
    `state`, `planner`, `tree`).  num_draft: an integer or 'auto' (the default).
    """
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    if max_tokens == 0:
        raise MTPDError("--max-tokens must be non-zero (use -1 for no limit)")
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    prompt = encode_prompt(tokenizer, prompt)
    num_draft = parse_num_draft(num_draft) if num_draft is not None else DEFAULT_NUM_DRAFT
    if num_draft == "auto" and kwargs.get("planner") is None and kwargs.get("cluster") is None:
        # a fresh planner starts from the head set's measured acceptance and this
        # device's step costs (measured once, on first use): it drafts from the first step
        from .costs import seed_planner
        from .engine import DraftPlanner

        source = kwargs.get("draft", "heads")
        if heads is None and source != "prompt-lookup":
            source = "prompt-lookup"
        kwargs["planner"] = seed_planner(DraftPlanner("auto", source, tree=kwargs.get("tree", "auto")),
                                         model, tokenizer, heads)
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    stats = SpecStats()
    gen = mtp_generate_step(
        prompt, model, heads, num_draft=num_draft, max_tokens=max_tokens, stats=stats, **kwargs
    )
    tic = time.perf_counter()
    n = -1
    token, logprobs, from_draft = None, None, False
    prompt_tps = 0.0

    def response(n, token, logprobs, from_draft, finish_reason=None) -> GenerationResponse:
        return GenerationResponse(
            text=detokenizer.last_segment,
            token=token,
            logprobs=logprobs,
            from_draft=from_draft,
            prompt_tokens=prompt.size,
            prompt_tps=prompt_tps,
            generation_tokens=n + 1,
            generation_tps=(n + 1) / max(time.perf_counter() - tic, 1e-9),
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish_reason,
            stats=stats,
        )

    for n, (token, logprobs, from_draft) in enumerate(gen):
        if n == 0:
            prompt_time = time.perf_counter() - tic
            prompt_tps = prompt.size / prompt_time
            tic = time.perf_counter()
        if token in tokenizer.eos_token_ids:
            break
        detokenizer.add_token(token)
        if (n + 1) == max_tokens:
            break
        yield response(n, token, logprobs, from_draft)
    gen.close()
    detokenizer.finalize()
    finish = "stop" if token in tokenizer.eos_token_ids else "length"
    yield response(n, token, logprobs, from_draft, finish)


def acceptance_line(stats: SpecStats) -> str:
    src = ", ".join(f"{k} {v}" for k, v in sorted(stats.sources.items()))
    src = f", steps: {src}" if src else ""
    if stats.first_step:
        src += f" (first: {stats.first_step})"
    if stats.tree_steps:
        src += (f"; trees {stats.tree_steps} ({stats.tree_tokens / stats.tree_steps:.1f} alternatives each, "
                f"one accepted in {stats.tree_hits}"
                + (f", {stats.branch_accepted} tokens accepted below them" if stats.branch_accepted else "") + ")")
    if not stats.rounds:
        return f"Acceptance: no drafting (num_draft={stats.num_draft}{src})"
    ar = " ".join(f"{x:.2f}" for x in stats.acceptance_rates)
    car = " ".join(f"{x:.2f}" for x in stats.cumulative_acceptance)
    return (
        f"Acceptance: tau {stats.mean_accepted_length:.2f} tokens/forward, "
        f"{stats.emitted} tokens in {stats.forwards + 1} backbone forwards, "
        f"AR_k [{ar}], CAR_k [{car}]{src}"
    )
