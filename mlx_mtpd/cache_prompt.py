"""`mlx_mtpd cache-prompt`: mlx-lm's own prompt caching (`mlx_lm.cache_prompt`,
its options unchanged) for this project's model folders, the default model
when `--model` is left out; `generate --prompt-cache-file` continues what it
writes, as `mlx_lm.generate` does."""

from __future__ import annotations

import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> None:
    from . import blas  # noqa: F401  (OpenBLAS bound before MLX computes anything)
    from .errors import run_main

    args = list(sys.argv[1:] if argv is None else argv)

    def run():
        if "--model" not in args and not any(a.startswith("--model=") for a in args) and not (
                {"-h", "--help"} & set(args)):
            from .utils import default_model_path

            args[:0] = ["--model", str(default_model_path())]
        from mlx_lm import cache_prompt

        sys.argv = ["mlx_mtpd cache-prompt"] + args
        cache_prompt.main()

    run_main("cache-prompt", run)


if __name__ == "__main__":
    main()
