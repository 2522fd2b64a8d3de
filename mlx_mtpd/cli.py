"""`mlx_mtpd <subcommand>`: one console script, subcommands as in mlx-lm."""

from __future__ import annotations

import importlib
import sys

from .errors import run_main  # noqa: F401  (where the subcommands' runner used to live)

SUBCOMMANDS = {
    "convert": "mlx_mtpd.convert",
    "generate": "mlx_mtpd.generate",
    "chat": "mlx_mtpd.chat",
    "server": "mlx_mtpd.server",
    "init-heads": "mlx_mtpd.training.init_heads",
    "gen-data": "mlx_mtpd.training.gen_data",
    "train": "mlx_mtpd.training.train",
    "eval-heads": "mlx_mtpd.training.eval_heads",
    "distill": "mlx_mtpd.training.distill",
    "bench": "mlx_mtpd.bench",
    "cache-prompt": "mlx_mtpd.cache_prompt",
    "doctor": "mlx_mtpd.doctor",
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print("usage: mlx_mtpd {" + ",".join(SUBCOMMANDS) + "} [options]")
        print("Run `mlx_mtpd <subcommand> --help` for the options of each.")
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    if sys.argv[1] == "--version":
        from . import __version__

        print(__version__)
        return
    sub = sys.argv.pop(1)
    if sub not in SUBCOMMANDS:
        print(f"mlx_mtpd: error: unknown subcommand {sub!r} (choose from {', '.join(SUBCOMMANDS)})",
              file=sys.stderr)
        sys.exit(2)
    sys.argv[0] = f"mlx_mtpd {sub}"
    importlib.import_module(SUBCOMMANDS[sub]).main()


if __name__ == "__main__":
    main()
