"""`mlx_mtpd init-heads`: an untrained head set, so the engine runs before training."""

from __future__ import annotations

import argparse

DEFAULT_DRAFT_VOCAB = 8192


def main(argv=None) -> None:
    from ..errors import run_main

    p = argparse.ArgumentParser(prog="mlx_mtpd init-heads", description=__doc__)
    p.add_argument("--model", default=None, help="MLX model folder (default: SmolLM2-135M-Instruct).")
    p.add_argument("--num-heads", type=int, default=1, help="Number of heads K (default 1).")
    p.add_argument("--out", required=True, help="Output folder for mtp_heads.safetensors + mtp_config.json.")
    p.add_argument("--loop", choices=("last", "cycle"), default="last", help="Default loop policy.")
    p.add_argument("--draft-vocab", type=int, default=DEFAULT_DRAFT_VOCAB,
                   help=f"Draft over the first N token ids (default {DEFAULT_DRAFT_VOCAB}; 0: full vocabulary).")
    p.add_argument("--force", action="store_true", help="Replace an existing output folder.")
    args = p.parse_args(argv)

    def run():
        from pathlib import Path

        from ..errors import MTPDError
        from ..heads import init_heads, save_heads
        from ..utils import load

        if args.num_heads < 1:
            raise MTPDError(f"--num-heads must be at least 1 (got {args.num_heads})")
        out = Path(args.out)
        if out.exists() and not args.force:
            raise MTPDError(f"{out} already exists: choose another --out or pass --force")
        model, _, _ = load(args.model)
        hs = init_heads(model, args.num_heads, loop=args.loop, draft_vocab=args.draft_vocab)
        save_heads(hs, out, force=args.force)
        print(f"[mlx_mtpd] wrote {args.num_heads} untrained heads to {out}")

    run_main("init-heads", run)
