"""`mlx_mtpd <subcommand>`: one console script, subcommands as in mlx-lm."""

from __future__ import annotations

import importlib
import sys
from typing import Callable

SUBCOMMANDS = {
    "convert": "mlx_mtpd.convert",
    "generate": "mlx_mtpd.generate",
    "chat": "mlx_mtpd.chat",
    "server": "mlx_mtpd.server",
    "init-heads": "mlx_mtpd.init_heads",
    "gen-data": "mlx_mtpd.gen_data",
    "train": "mlx_mtpd.train",
    "eval-heads": "mlx_mtpd.eval_heads",
    "bench": "mlx_mtpd.bench",
    "doctor": "mlx_mtpd.doctor",
}


def run_main(name: str, fn: Callable[[], None]) -> None:
    """Run a CLI body; user errors become one line on stderr and exit status 1."""
    from .errors import MTPDError

    try:
        fn()
    except MTPDError as e:
        print(f"mlx_mtpd {name}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"mlx_mtpd {name}: interrupted", file=sys.stderr)
        sys.exit(130)
    except RuntimeError as e:
        from .distributed import is_link_error

        if not is_link_error(e):
            raise
        import os

        rank = os.environ.get("MLX_RANK", "?")
        print(f"mlx_mtpd {name}: error: rank {rank} lost another rank ({e}): every rank stops", file=sys.stderr,
              flush=True)
        os._exit(1)  # not sys.exit: MLX's communication threads would keep the process alive


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
