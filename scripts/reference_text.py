"""Text already on every machine, for teacher-labelled training: the Python
documentation's topics (`pydoc_data`, part of the standard library).

The heads learn from it what the backbone would predict (the teacher's top-N
on every position, from the cache pass), not the text's own next tokens, so
any well-formed text is usable; it keeps a head trained on a few hundred
thousand answer tokens from memorising them.

    python scripts/reference_text.py OUT.txt [--chars N]
"""

from __future__ import annotations

import argparse
from pathlib import Path


def python_docs(max_chars: int) -> str:
    """The documentation topics in a fixed order, cut at a topic boundary."""
    from pydoc_data.topics import topics

    out, n = [], 0
    for key in sorted(topics):
        text = topics[key].strip()
        if n + len(text) > max_chars:
            break
        out.append(text)
        n += len(text) + 2
    return "\n\n".join(out) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="Output .txt file (a train --data input).")
    p.add_argument("--chars", type=int, default=240_000, help="At most this many characters (about 4 per token).")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(python_docs(args.chars))
    tmp.rename(out)
    print(f"{out}: {out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
