"""`mlx_mtpd generate` and the `generate` / `stream_generate` API, mirroring mlx-lm's."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from .engine import parse_num_draft
from .errors import MTPDError
from .streaming import (  # noqa: F401  (re-exported: the API mirrors mlx-lm's generate module)
    DEFAULT_NUM_DRAFT, GenerationResponse, acceptance_line, encode_prompt, stream_generate,
)
from .tree import parse_tree, tree_note

def generate(model, tokenizer, prompt, verbose: bool = False, session=None, **kwargs) -> str:
    """Generate a complete response, as `mlx_lm.generate` does (through
    `session`, a :class:`mlx_mtpd.session.Session`, when given: its heads and
    drafting settings; `kwargs` are then `max_tokens` and sampling)."""
    if verbose:
        print("=" * 10)
    text = ""
    response = None
    if session is not None:
        responses = session.stream(encode_prompt(session.tokenizer, prompt).tolist(), **kwargs)
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
    p.add_argument("--tree", default="auto",
                   help="Head drafts as trees: 'auto' (default: the shape chosen per step from measured "
                        "acceptance by rank and cost), 'off' (chains), W (candidates at every depth, "
                        "at most 4) or W1,W2,... per depth.")


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
    from . import blas
    from .errors import run_main

    args = setup_arg_parser().parse_args(argv)

    def run():
        from . import distributed

        if args.max_tokens == 0:
            raise MTPDError("--max-tokens must be non-zero (use -1 for no limit)")
        num_draft = parse_num_draft(args.num_draft)
        tree = parse_tree(args.tree)
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
                              cluster=cluster, tree=tree)
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
            print(f"[mlx_mtpd] BLAS: {blas.describe()}", file=sys.stderr)
            if heads is None:
                print("[mlx_mtpd] no MTP heads: drafting by prompt lookup only", file=sys.stderr)
            note = tree_note(model, heads, tree)
            if note:
                print(f"[mlx_mtpd] {note}", file=sys.stderr)
        text_prompt = render_prompt(tokenizer, prompt, args.system_prompt, not args.ignore_chat_template)
        out = generate(
            model, tokenizer, text_prompt, verbose=args.verbose, max_tokens=args.max_tokens,
            heads=heads, num_draft=num_draft, draft=default_draft(heads, args.draft), loop=args.loop, temp=args.temp,
            top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, tree=tree,
        )
        if not args.verbose:
            print(out)

    run_main("generate", run)
