"""`mlx_mtpd generate` and the `generate` / `stream_generate` API, mirroring mlx-lm's."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from .engine import parse_num_draft
from .errors import MTPDError
from .kvcache import KVOptions, add_kv_args, kv_note
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
    add_kv_args(p)
    p.add_argument("--prompt-cache-file", default=None,
                   help="A prompt cache file written by mlx_lm.cache_prompt (or `mlx_mtpd cache-prompt`): the "
                        "prompt continues what it holds, as with mlx_lm.generate.")
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
                        "at most 4) or W1,W2,... per depth; /F after either continues each of depth 1's "
                        "alternatives for F more tokens (a branch of its own, e.g. 4,1,1/2).")


def default_draft(heads, draft: Optional[str]) -> str:
    return draft or ("heads+lookup" if heads is not None else "prompt-lookup")


def render_prompt(tokenizer, prompt: str, system: Optional[str], use_template: bool):
    if use_template and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return prompt


def read_prompt_cache(path: str, args, kv: KVOptions):
    """(caches, metadata) of an mlx-lm prompt cache file; `args.model` becomes
    the file's model when none was given (a different one is an error, as in
    mlx_lm.generate)."""
    from pathlib import Path

    from mlx_lm.models.cache import QuantizedKVCache, load_prompt_cache

    if not Path(path).is_file():
        raise MTPDError(f"prompt cache file {path} not found: write one with mlx_lm.cache_prompt")
    try:
        caches, meta = load_prompt_cache(path, return_metadata=True)
    except Exception as e:  # mlx raises several kinds on a file that is not a cache
        raise MTPDError(f"{path} is not a prompt cache file ({type(e).__name__}: {e}): "
                        "write it again with mlx_lm.cache_prompt") from None
    made_for = meta.get("model")
    if args.model is None:
        args.model = made_for
    elif made_for and args.model != made_for and Path(args.model).resolve() != Path(made_for).resolve():
        raise MTPDError(f"the prompt cache file was made for {made_for}, not {args.model}: "
                        "drop --model or make the cache again")
    q = [c for c in caches if isinstance(c, QuantizedKVCache)]
    if q and ((kv.kv_bits is not None and kv.kv_bits != q[0].bits) or kv.kv_group_size != q[0].group_size):
        raise MTPDError(f"--kv-bits/--kv-group-size do not match the prompt cache file's ({q[0].bits} bits, "
                        f"groups of {q[0].group_size})")
    return caches, meta


def _from_prompt_cache(args, model, tokenizer, heads, prompt: str, cache_file, num_draft, tree, kv) -> str:
    """mlx_lm.generate's --prompt-cache-file: the cache holds the start of a
    user message; the prompt is rendered as mlx-lm renders it and only the part
    from the user's text on is appended."""
    from .engine import UNKNOWN, DraftPlanner, DraftState

    caches, _ = cache_file
    use_template = not args.ignore_chat_template and getattr(tokenizer, "chat_template", None)
    if use_template:
        messages = ([{"role": "system", "content": args.system_prompt}] if args.system_prompt else [])
        messages.append({"role": "user", "content": prompt})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        messages[-1]["content"] = "<query>"
        probe = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        text = text[probe.index("<query>"):]
    else:
        text = prompt
    ids = tokenizer.encode(text, add_special_tokens=not use_template)
    draft = default_draft(heads, args.draft)
    planner = DraftPlanner(num_draft, draft if heads is not None else "prompt-lookup", tree=tree)
    depth = planner.num_draft if heads is not None and planner.uses_heads else 0
    state = DraftState(model, heads if depth else None, depth, args.loop, kv)
    n = state.adopt(caches)
    if args.verbose:
        print(f"[mlx_mtpd] prompt cache: {n} tokens cached, {len(ids)} new", file=sys.stderr)
    return generate(model, tokenizer, [UNKNOWN] * n + list(ids), verbose=args.verbose, max_tokens=args.max_tokens,
                    heads=heads, num_draft=num_draft, draft=draft, loop=args.loop, temp=args.temp,
                    top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, tree=tree, kv=kv, state=state)


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
        kv = KVOptions.from_args(args)
        cluster = distributed.setup(args)
        leader = cluster is None or cluster.leader
        prompt = (sys.stdin.read() if args.prompt == "-" else args.prompt) if leader else None
        if leader and not prompt:
            raise MTPDError("the prompt is empty: pass --prompt TEXT")
        distributed.seed_all(cluster, args.seed)
        cache_file = None
        if args.prompt_cache_file:
            if cluster is not None:
                raise MTPDError("--prompt-cache-file is for one process: under mlx.launch, pass the whole prompt")
            cache_file = read_prompt_cache(args.prompt_cache_file, args, kv)
        model, tokenizer, heads = distributed.load_for(args, cluster)
        if cluster is not None:
            from .session import Session

            session = Session(model, tokenizer, heads, num_draft=num_draft, draft=args.draft, loop=args.loop,
                              cluster=cluster, tree=tree, kv=kv)
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
        if args.prompt_cache_file:
            out = _from_prompt_cache(args, model, tokenizer, heads, prompt, cache_file, num_draft, tree, kv)
            if not args.verbose:
                print(out)
            return
        if args.verbose:
            print(f"[mlx_mtpd] BLAS: {blas.describe()}", file=sys.stderr)
            if heads is None:
                print("[mlx_mtpd] no MTP heads: drafting by prompt lookup only", file=sys.stderr)
            for note in (tree_note(model, heads, tree), kv_note(model, kv)):
                if note:
                    print(f"[mlx_mtpd] {note}", file=sys.stderr)
        text_prompt = render_prompt(tokenizer, prompt, args.system_prompt, not args.ignore_chat_template)
        out = generate(
            model, tokenizer, text_prompt, verbose=args.verbose, max_tokens=args.max_tokens,
            heads=heads, num_draft=num_draft, draft=default_draft(heads, args.draft), loop=args.loop, temp=args.temp,
            top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, tree=tree, kv=kv,
        )
        if not args.verbose:
            print(out)

    run_main("generate", run)
