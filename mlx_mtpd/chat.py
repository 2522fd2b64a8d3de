"""`mlx_mtpd chat`: a terminal chat that drafts with MTP heads.

The conversation's caches stay between turns (only the new turn is prefilled),
tokens stream as they are accepted, and the draft length is chosen per step
from measured acceptance and cost (`--num-draft auto`).  Inside the chat:
/reset, /stats, /help, /quit; Ctrl-C stops an answer and keeps the conversation.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Dict, List

from .errors import MTPDError

HELP = "commands: /reset (new conversation), /stats (acceptance and speed), /help, /quit (or Ctrl-D)"


def setup_arg_parser() -> argparse.ArgumentParser:
    from .generate import add_draft_args, add_sampling_args
    from .kvcache import add_kv_args

    p = argparse.ArgumentParser(prog="mlx_mtpd chat", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="MLX model folder or hub id (default: SmolLM2-135M-Instruct).")
    p.add_argument("--heads", default=None, help="Head set folder (default: the model folder's, if any).")
    p.add_argument("--system", "--system-prompt", dest="system", default=None, help="System message.")
    p.add_argument("--max-tokens", "-m", type=int, default=512, help="Maximum tokens per answer.")
    add_sampling_args(p)
    add_draft_args(p)
    add_kv_args(p)
    p.add_argument("--loop", choices=("last", "cycle"), default=None, help="Loop policy beyond the trained heads.")
    p.add_argument("--max-context", type=int, default=None,
                   help="Context size in tokens (default: the model's); older turns are dropped to fit.")
    p.add_argument("--seed", type=int, default=None, help="Random seed.")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="Dtype of the default model when it is first imported.")
    from .distributed import add_args

    add_args(p)
    return p


def dim(text: str) -> str:
    return f"\x1b[2m{text}\x1b[0m" if sys.stdout.isatty() else text


def turn_line(session) -> str:
    t = session.turns[-1]
    parts = [f"{t.generation_tokens} tokens", f"{t.tokens_per_s:.1f} tok/s"]
    if t.stats.rounds:
        parts.append(f"tau {t.stats.mean_accepted_length:.2f}")
    est = session.speedup_estimate(t)
    if est is not None:
        parts.append(f"~{est:.2f}x plain")
    parts.append(f"prompt +{t.new_prompt_tokens} tokens")
    if t.finish_reason == "interrupted":
        parts.append("interrupted")
    elif t.finish_reason == "length":
        parts.append("hit --max-tokens")
    return "[" + ", ".join(parts) + "]"


def stats_text(session) -> str:
    if not session.turns:
        return "no answers yet"
    last, s = session.turns[-1], session.summary()
    lines = []
    rows = (("last answer", last.stats, last.tokens_per_s), ("session", session.total, s["tokens_per_s"]))
    for name, st, tps in rows:
        ar = " ".join(f"{x:.2f}" for x in st.acceptance_rates) or "-"
        src = ", ".join(f"{k} {v}" for k, v in sorted(st.sources.items())) or "-"
        lines.append(f"{name}: {st.emitted} tokens, {tps:.1f} tok/s, tau {st.mean_accepted_length:.2f}, "
                     f"acceptance by position [{ar}], steps: {src}")
    plain = session.planner.plain_tokens_per_s
    if plain:
        lines.append(f"plain decoding measured at {plain:.1f} tok/s")
    return "\n".join(lines)


class _Interrupt:
    """Ctrl-C during an answer sets a flag the token loop checks (the caches
    stay consistent); at the prompt it behaves as usual."""

    def __init__(self):
        self.flag = False

    def __enter__(self):
        self.flag = False
        self.old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, *_):
        self.flag = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.old)
        return False


def main(argv=None) -> None:
    from . import blas  # noqa: F401  (binds OpenBLAS before mlx loads)
    from .errors import run_main

    args = setup_arg_parser().parse_args(argv)

    def run():
        from . import distributed
        from .engine import make_logprobs_transform
        from .generate import parse_num_draft
        from .kvcache import KVOptions
        from .session import Session

        from .tree import parse_tree

        num_draft = parse_num_draft(args.num_draft)
        tree = parse_tree(args.tree)
        if args.max_tokens == 0:
            raise MTPDError("--max-tokens must be non-zero (use -1 for no limit)")
        if args.max_context is not None and args.max_context < 16:
            raise MTPDError(f"--max-context must be at least 16 tokens (got {args.max_context})")
        sampling = dict(temp=args.temp, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p)
        make_logprobs_transform(**sampling)  # bad values: one clear error now
        cluster = distributed.setup(args)
        distributed.seed_all(cluster, args.seed)
        model, tokenizer, heads = distributed.load_for(args, cluster)
        session = Session(model, tokenizer, heads, num_draft=num_draft, draft=args.draft, loop=args.loop,
                          max_context=args.max_context, memory=True, cluster=cluster, tree=tree,
                          kv=KVOptions.from_args(args))
        if cluster is not None and not cluster.leader:
            session.follow()
            return
        try:
            converse(args, session, heads, num_draft, sampling)
        finally:
            session.close()

    run_main("chat", run)


def converse(args, session, heads, num_draft, sampling) -> None:
    """The terminal loop (rank 0's, under mlx.launch)."""
    from .tree import tree_note

    heads_note = f"{heads.num_heads} MTP head(s)" if heads is not None else "no MTP heads"
    if session.cluster is not None:
        from .distributed import describe

        heads_note += f", {session.cluster.size} ranks ({describe(session.model)} parallel)"
    print(dim(f"[mlx_mtpd chat] {heads_note}, drafting: {session.draft}, num-draft {num_draft}. {HELP}"))
    from .kvcache import kv_note

    notes = [tree_note(session.model, heads, session.tree) if session.cluster is None else None,
             kv_note(session.model, session.kv)]
    for note in notes:
        if note:
            print(dim(f"[mlx_mtpd chat] {note}"))
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages: List[Dict[str, str]] = list(system)
    while True:
        try:
            user = input(">> ")
        except EOFError:
            print()
            break
        except KeyboardInterrupt:
            print(dim("\n(Ctrl-C stops an answer; /quit or Ctrl-D leaves)"))
            continue
        cmd = user.strip()
        if not cmd:
            continue
        if cmd in ("/quit", "/exit", "/q"):
            break
        if cmd == "/reset":
            messages = list(system)
            session.reset()
            print(dim("[conversation cleared]"))
            continue
        if cmd == "/stats":
            print(dim(stats_text(session)))
            continue
        if cmd in ("/help", "/?"):
            print(dim(HELP))
            continue
        if cmd.startswith("/"):
            print(dim(f"unknown command {cmd.split()[0]!r}; {HELP}"))
            continue
        with _Interrupt() as intr:  # from here Ctrl-C only stops the answer
            try:
                fitted, ids, dropped = session.fit_messages(
                    messages + [{"role": "user", "content": user}], args.max_tokens)
            except MTPDError as e:
                print(dim(f"[{e}]"))
                continue
            if dropped:
                print(dim(f"[context full: dropped the {dropped} oldest turn(s)]"))
            messages = fitted
            text = ""
            for r in session.stream(ids, max_tokens=args.max_tokens, should_stop=lambda: intr.flag,
                                    **sampling):
                print(r.text, end="", flush=True)
                text += r.text
        print()
        print(dim(turn_line(session)))
        messages.append({"role": "assistant", "content": text})


if __name__ == "__main__":
    main()
