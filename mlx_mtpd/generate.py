"""`mlx_mtpd generate` and the `generate` / `stream_generate` API, mirroring mlx-lm's."""

from __future__ import annotations

import argparse
import sys
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


def _encode(tokenizer, prompt) -> mx.array:
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
    `state`, `planner`).  num_draft: an integer or 'auto' (the default).
    """
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    if max_tokens == 0:
        raise MTPDError("--max-tokens must be non-zero (use -1 for no limit)")
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    prompt = _encode(tokenizer, prompt)
    num_draft = parse_num_draft(num_draft) if num_draft is not None else DEFAULT_NUM_DRAFT
    if num_draft == "auto" and kwargs.get("planner") is None and kwargs.get("cluster") is None:
        # a fresh planner starts from the head set's measured acceptance and this
        # device's step costs (measured once, on first use): it drafts from the first step
        from .costs import seed_planner
        from .engine import DraftPlanner

        source = kwargs.get("draft", "heads")
        if heads is None and source != "prompt-lookup":
            source = "prompt-lookup"
        kwargs["planner"] = seed_planner(DraftPlanner("auto", source), model, tokenizer, heads)
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
    if not stats.rounds:
        return f"Acceptance: no drafting (num_draft={stats.num_draft}{src})"
    ar = " ".join(f"{x:.2f}" for x in stats.acceptance_rates)
    car = " ".join(f"{x:.2f}" for x in stats.cumulative_acceptance)
    return (
        f"Acceptance: tau {stats.mean_accepted_length:.2f} tokens/forward, "
        f"{stats.emitted} tokens in {stats.forwards + 1} backbone forwards, "
        f"AR_k [{ar}], CAR_k [{car}]{src}"
    )


def generate(model, tokenizer, prompt, verbose: bool = False, session=None, **kwargs) -> str:
    """Generate a complete response, as `mlx_lm.generate` does (through
    `session`, a :class:`mlx_mtpd.session.Session`, when given: its heads and
    drafting settings; `kwargs` are then `max_tokens` and sampling)."""
    if verbose:
        print("=" * 10)
    text = ""
    response = None
    if session is not None:
        responses = session.stream(_encode(session.tokenizer, prompt).tolist(), **kwargs)
    else:
        responses = stream_generate(model, tokenizer, prompt, **kwargs)
    for response in responses:
        if verbose:
            print(response.text, end="", flush=True)
        text += response.text
    if verbose and response is not None:
        print()
        print("=" * 10)
        if len(text) == 0:
            print("No text generated for this prompt")
        print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec")
        print(
            f"Generation: {response.generation_tokens} tokens, "
            f"{response.generation_tps:.3f} tokens-per-sec"
        )
        print(f"Peak memory: {response.peak_memory:.3f} GB")
        print(acceptance_line(response.stats))
    return text


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx_mtpd generate", description="Generate text, drafting with MTP heads.")
    p.add_argument("--model", default=None, help="MLX model folder or hub id (default: SmolLM2-135M-Instruct).")
    p.add_argument("--heads", default=None, help="Head set folder (default: the model folder's, if any).")
    p.add_argument("--prompt", "-p", default="Once upon a time", help="Prompt text ('-' reads stdin).")
    p.add_argument("--system-prompt", default=None, help="System message for the chat template.")
    p.add_argument("--max-tokens", "-m", type=int, default=256, help="Maximum tokens to generate.")
    add_sampling_args(p)
    add_draft_args(p)
    p.add_argument("--loop", choices=("last", "cycle"), default=None,
                   help="How depths beyond the trained heads reuse them (default: the head set's).")
    p.add_argument("--seed", type=int, default=None, help="Random seed.")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="Dtype of the default model when it is first imported.")
    p.add_argument("--ignore-chat-template", action="store_true", help="Feed the prompt as raw text.")
    p.add_argument("--chat-template", dest="ignore_chat_template", action="store_false",
                   help="Use the model's chat template (the default when it has one).")
    p.add_argument("--verbose", type=lambda s: s.lower() in ("1", "true", "yes"), nargs="?", const=True,
                   default=True, help="Print timing and acceptance (default true).")
    from .distributed import add_args

    add_args(p)
    return p


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """mlx-lm's sampling options, shared by generate and chat."""
    p.add_argument("--temp", type=float, default=0.0, help="Sampling temperature (0: greedy).")
    p.add_argument("--top-p", type=float, default=0.0, help="Nucleus sampling threshold.")
    p.add_argument("--top-k", type=int, default=0, help="Sample from the top k tokens.")
    p.add_argument("--min-p", type=float, default=0.0, help="Min-p sampling threshold.")


def add_draft_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-draft", default="auto",
                   help="Tokens drafted per step, or 'auto' (default): chosen per step from measured "
                        "acceptance and cost, plain decoding when drafting does not pay.")
    p.add_argument("--draft", choices=("heads", "prompt-lookup", "heads+lookup"), default=None,
                   help="Draft source (default: heads+lookup with heads, prompt-lookup without).")


def default_draft(heads, draft: Optional[str]) -> str:
    return draft or ("heads+lookup" if heads is not None else "prompt-lookup")


def render_prompt(tokenizer, prompt: str, system: Optional[str], use_template: bool):
    if use_template and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return prompt


def main(argv=None) -> None:
    from . import _blas
    from .cli import run_main

    args = setup_arg_parser().parse_args(argv)

    def run():
        from . import distributed

        if args.max_tokens == 0:
            raise MTPDError("--max-tokens must be non-zero (use -1 for no limit)")
        num_draft = parse_num_draft(args.num_draft)
        cluster = distributed.setup(args)
        leader = cluster is None or cluster.leader
        prompt = (sys.stdin.read() if args.prompt == "-" else args.prompt) if leader else None
        if leader and not prompt:
            raise MTPDError("the prompt is empty: pass --prompt TEXT")
        distributed.seed_all(cluster, args.seed)
        model, tokenizer, heads = distributed.load_for(args, cluster)
        if cluster is not None:
            from .session import Session

            session = Session(model, tokenizer, heads, num_draft=num_draft, draft=args.draft, loop=args.loop,
                              cluster=cluster)
            if not cluster.leader:
                session.follow()
                return
            print(f"[mlx_mtpd] {cluster.size} ranks, {distributed.describe(model)} parallel", file=sys.stderr)
            text_prompt = render_prompt(tokenizer, prompt, args.system_prompt, not args.ignore_chat_template)
            try:
                out = generate(model, tokenizer, text_prompt, verbose=args.verbose, session=session,
                               max_tokens=args.max_tokens, temp=args.temp, top_p=args.top_p, top_k=args.top_k,
                               min_p=args.min_p)
            finally:
                session.close()
            if not args.verbose:
                print(out)
            return
        if args.verbose:
            print(f"[mlx_mtpd] BLAS: {_blas.describe()}", file=sys.stderr)
            if heads is None:
                print("[mlx_mtpd] no MTP heads: drafting by prompt lookup only", file=sys.stderr)
        text_prompt = render_prompt(tokenizer, prompt, args.system_prompt, not args.ignore_chat_template)
        out = generate(
            model, tokenizer, text_prompt, verbose=args.verbose, max_tokens=args.max_tokens,
            heads=heads, num_draft=num_draft, draft=default_draft(heads, args.draft), loop=args.loop, temp=args.temp,
            top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        )
        if not args.verbose:
            print(out)

    run_main("generate", run)
