"""One exception type for problems the user can fix, and the runner that turns
it into one line on stderr for every CLI (`run_main`)."""

from __future__ import annotations

import sys
from typing import Callable


class MTPDError(Exception):
    """Bad input or environment; the message names the problem and the fix."""


def is_link_error(e: BaseException) -> bool:
    """A collective failed because a peer went away (mlx.distributed's backends)."""
    msg = str(e)
    return isinstance(e, RuntimeError) and msg.startswith(("[ring]", "[jaccl]", "[mpi]", "[distributed]"))


def run_main(name: str, fn: Callable[[], None]) -> None:
    """Run a CLI body; user errors become one line on stderr and exit status 1."""
    try:
        fn()
    except MTPDError as e:
        print(f"mlx_mtpd {name}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"mlx_mtpd {name}: interrupted", file=sys.stderr)
        sys.exit(130)
    except RuntimeError as e:
        if not is_link_error(e):
            raise
        import os

        rank = os.environ.get("MLX_RANK", "?")
        print(f"mlx_mtpd {name}: error: rank {rank} lost another rank ({e}): every rank stops", file=sys.stderr,
              flush=True)
        os._exit(1)  # not sys.exit: MLX's communication threads would keep the process alive
