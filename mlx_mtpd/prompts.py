"""Prompt files, read the same way by every command: `.jsonl` records with
`prompt`, `text` or chat `messages`, or a text file with one prompt a line;
and a prompt as the chat messages a template renders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

from .errors import MTPDError

DATA_DIR = Path(__file__).parent / "data"
BENCH_PROMPTS = DATA_DIR / "prompts_bench.jsonl"  # held out from training
EDITS_PROMPTS = DATA_DIR / "conversations_bench.jsonl"  # last answers that edit or repeat an earlier one
CHAT_PROMPTS = DATA_DIR / "prompts_chat.jsonl"  # ordinary chat requests
EVAL_PROMPTS = DATA_DIR / "prompts_eval.jsonl"  # held out, for eval-heads
POOL_PROMPTS = DATA_DIR / "prompts_pool.jsonl"  # the training pool (topics x templates; none of EVAL's topics)
NAMED_PROMPTS = {"edits": EDITS_PROMPTS, "chat": CHAT_PROMPTS, "bench": BENCH_PROMPTS, "eval": EVAL_PROMPTS,
                 "pool": POOL_PROMPTS}


def resolve(name_or_path) -> Path:
    """A shipped prompt file's name ('chat', 'edits', 'bench', 'eval', 'pool') or a path."""
    return NAMED_PROMPTS.get(str(name_or_path), Path(name_or_path))


def read_prompts(path: Path) -> List[str]:
    """Prompts from a .jsonl file (`prompt`, `text` or chat `messages`) or a text file (one a line)."""
    path = Path(path)
    if not path.exists():
        raise MTPDError(f"prompts file {path} not found")
    prompts = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if path.suffix == ".jsonl":
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise MTPDError(f"{path}:{i}: invalid JSON ({e.msg}): fix or remove the line") from None
                if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
                    prompts.append(obj["prompt"])
                elif isinstance(obj, dict) and isinstance(obj.get("text"), str):
                    prompts.append(obj["text"])
                elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
                    prompts.append(obj["messages"])
                else:
                    raise MTPDError(f"{path}:{i}: expected an object with 'prompt', 'text' or 'messages'")
            else:
                prompts.append(line)
    if not prompts:
        raise MTPDError(f"{path} holds no prompts")
    return prompts


def chat_messages(prompt, system=None):
    """A prompt as chat messages: text becomes one user turn; a `messages` list
    is kept; `system`, when given, goes first."""
    msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    return ([{"role": "system", "content": system}] if system else []) + msgs
