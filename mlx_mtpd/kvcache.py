"""mlx-lm's KV cache options, and drafting past a sliding window: rotating KV
caches that can take back a rejected draft (docs/DESIGN.md, "The caches").

mlx-lm's `RotatingKVCache` (the sliding-window layers of Gemma 3, gpt-oss,
Mistral's sliding variants; every layer under `--max-kv-size`) can be trimmed
only until it wraps. `WindowKVCache` is the same cache (same buffer, same
updates, same masks wherever mlx-lm's are exact) with two additions:

- after a multi-token update its buffer is in temporal order (mlx-lm's
  concatenating path): taking back the last n entries is a slice, and the
  buffer still holds every position the next query's window needs (mlx-lm
  keeps `max_size - 1 + n` entries after an n-token update);
- a verification forward of n tokens is masked exactly as n single-token steps
  of plain decoding would see the cache: position p attends to the `keep`
  first positions and the last `max_size - keep` up to itself.  (mlx-lm's own
  multi-token mask lets a chunk's later tokens lose the `keep` first
  positions; a prompt's prefill keeps mlx-lm's masks, so that the caches equal
  mlx-lm's after it.)
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import List, Optional, Sequence

import mlx.core as mx
from mlx_lm.models.cache import RotatingKVCache

from .errors import MTPDError


@dataclass(frozen=True)
class KVOptions:
    """mlx-lm's KV cache options, under mlx-lm's names (`mlx_lm.generate`):
    a rotating cache of `max_kv_size` entries for every layer of a model that
    makes no caches of its own (the first 4 positions always kept), and
    quantized caches (`kv_bits`, `kv_group_size`) from `quantized_kv_start`
    cached tokens on (sliding-window layers stay full precision: mlx-lm does
    not quantize rotating caches)."""

    max_kv_size: Optional[int] = None
    kv_bits: Optional[int] = None
    kv_group_size: int = 64
    quantized_kv_start: int = 5000

    def __post_init__(self):
        if self.max_kv_size is not None and self.max_kv_size < 8:
            raise MTPDError(f"--max-kv-size {self.max_kv_size} is too small: give at least 8 tokens")
        if self.kv_bits is not None and self.kv_bits not in (2, 3, 4, 5, 6, 8):
            raise MTPDError(f"--kv-bits {self.kv_bits} is not supported: choose 2, 3, 4, 5, 6 or 8")
        if self.kv_group_size not in (32, 64, 128):
            raise MTPDError(f"--kv-group-size {self.kv_group_size} is not supported: choose 32, 64 or 128")
        if self.quantized_kv_start < 0:
            raise MTPDError("--quantized-kv-start must be 0 or more")

    @classmethod
    def from_args(cls, args) -> "KVOptions":
        return cls(args.max_kv_size, args.kv_bits, args.kv_group_size, args.quantized_kv_start)


def kv_note(model, kv: Optional[KVOptions]) -> Optional[str]:
    """One line when an option does nothing on this model (as in mlx-lm)."""
    if kv is not None and kv.max_kv_size is not None and hasattr(model, "make_cache"):
        return ("--max-kv-size has no effect on this model: it makes its own caches "
                "(as with mlx_lm.generate)")
    return None


def add_kv_args(p) -> None:
    """mlx-lm's cache options, for generate, chat, server and bench."""
    p.add_argument("--max-kv-size", type=int, default=None,
                   help="Keep at most this many tokens in a rotating KV cache (models without caches of their "
                        "own; as mlx-lm). Drafting goes on past it.")
    p.add_argument("--kv-bits", type=int, default=None,
                   help="Quantize the KV cache to this many bits (as mlx-lm; default: no quantization).")
    p.add_argument("--kv-group-size", type=int, default=64, help="Group size of KV cache quantization.")
    p.add_argument("--quantized-kv-start", type=int, default=5000,
                   help="Quantize the KV cache from this many cached tokens on (with --kv-bits; as mlx-lm).")


class WindowKVCache(RotatingKVCache):
    def __init__(self, max_size: int, keep: int = 0):
        super().__init__(max_size, keep)
        self.prefilling = False  # mlx-lm's multi-token masks (see the module docstring)

    @classmethod
    def like(cls, cache: RotatingKVCache) -> "WindowKVCache":
        new = cls(cache.max_size, cache.keep)
        if cache.keys is not None:
            new.state = cache.state
        return new

    # -- taking back ------------------------------------------------------------
    def _in_order(self) -> bool:
        """The buffer holds its entries in temporal order up to `_idx`: never
        wrapped, or just after a multi-token update (or a take-back)."""
        return self.keys is None or self._idx == self.keys.shape[2] or self._idx == self.offset

    def can_take_back(self, n: int) -> bool:
        """Whether the last n entries can be dropped with the rest of the window
        still held: the buffer is in temporal order and keeps, after dropping,
        everything the next position attends to."""
        if n <= 0 or self.keys is None:
            return True
        held = self.keys.shape[2]
        return self._in_order() and n <= self.offset and held - n >= min(self.offset - n, self.max_size - 1)

    def is_trimmable(self) -> bool:
        return self._in_order()

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        if n <= 0:
            return 0
        if not self.can_take_back(n):
            raise ValueError(f"this window cache cannot take back {n} entries")
        self.offset -= n
        self._idx -= n
        self.keys = self.keys[..., : self._idx, :]
        self.values = self.values[..., : self._idx, :]
        return n

    def _update_in_place(self, keys, values):
        # After a take-back the buffer may hold max_size - 1 entries in order
        # with the window already full: append (mlx-lm would grow it by a
        # negative step); the next token rotates as usual.
        if self.keys is not None and self.keys.shape[2] < self.max_size and self.offset > self.keys.shape[2]:
            self._update_concat(keys, values)
            return self.keys_and_values()
        return super()._update_in_place(keys, values)

    # -- masks ------------------------------------------------------------------
    def positions(self) -> mx.array:
        """The position of each entry the buffer holds before an update (in
        temporal order): the `keep` first, then the most recent."""
        held = min(self.offset, self.max_size - 1) if self.keys is not None else 0
        b = mx.arange(held)
        if held < self.offset:
            b = mx.where(b < self.keep, b, b + (self.offset - held))
        return b

    def window_mask(self, query_positions: mx.array) -> mx.array:
        """(queries, held) bool: which held entries each query position sees."""
        pos = self.positions()[None, :]
        q = query_positions[:, None]
        return (pos <= q) & ((pos < self.keep) | (pos > q - (self.max_size - self.keep)))

    def make_mask(self, N: int, window_size: Optional[int] = None, return_array: bool = False):
        if N == 1 or self.prefilling or (window_size is not None and window_size != self.max_size):
            return super().make_mask(N, window_size=window_size, return_array=return_array)
        if self.offset + N <= self.max_size and not return_array:
            return "causal"  # nothing has left the window
        q = mx.arange(self.offset, self.offset + N)
        new = mx.arange(N)[None, :] <= mx.arange(N)[:, None]
        return mx.concatenate([self.window_mask(q), new], axis=1)


def windowed(caches: List) -> List:
    """The caches with every rotating one replaced by a WindowKVCache (in place)."""
    for i, c in enumerate(caches):
        if type(c) is RotatingKVCache:
            caches[i] = WindowKVCache.like(c)
    return caches


def wrapped(caches: Sequence, n: int = 0) -> bool:
    """Whether n more tokens would take some window cache past its window
    (where a tree's mask and kept path would need the window's layout)."""
    return any(isinstance(c, RotatingKVCache) and c.offset + n >= c.max_size for c in caches)


@contextmanager
def prefill_masks(caches: Sequence):
    """mlx-lm's own multi-token masks while a prompt is prefilled."""
    wins = [c for c in caches if isinstance(c, WindowKVCache)]
    for c in wins:
        c.prefilling = True
    try:
        yield
    finally:
        for c in wins:
            c.prefilling = False
