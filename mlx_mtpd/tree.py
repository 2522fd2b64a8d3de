"""Tree drafts: several candidates per draft position, verified by the backbone
in one forward with a tree attention mask and per-node positions (docs/DESIGN.md,
"Tree drafts").

The tree the heads propose is the chain they draft today, c_1..c_d, with each
depth's next-best candidates hung beside it: at depth i, `widths[i-1] - 1`
alternatives to c_i, children of c_{i-1} (the root, t_n, for depth 1).  The
nodes go to the backbone chain first, then the alternatives depth by depth:

    [t_n, c_1, ..., c_d, alts of depth 1, alts of depth 2, ...]

so an accepted chain prefix is a prefix of the verified tokens (its cache
entries are kept by a trim, as for a chain) and only an accepted alternative
moves one cache entry.  An alternative has no children: when it is accepted,
the backbone's token at it is the bonus token and the step ends there.  The
heads draft nothing more than for a chain (their top candidates at each depth
come from logits they compute anyway), so a tree costs only the verification
of its extra tokens.

Any mlx-lm model works whose attention layers take their positions from one
`rope(x, offset=cache.offset)` call and their mask from the cache's
`make_mask` (llama, qwen2, qwen3, gemma3, mistral, phi3, olmo2, granite,
starcoder2, ...), with plain, quantized or sliding-window KV caches (the last
while the window has room, as for chains); for the others (recurrent caches,
other position schemes) `tree_support` names the reason and the loop drafts
chains.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn

# A tree has at most this many candidates per depth (the chain's and its alternatives),
# and at most this many nodes (t_n included).
MAX_WIDTH = 4
MAX_TREE_SIZE = 16


def parse_tree(value) -> Optional[object]:
    """--tree: 'auto' (the planner chooses the shape), 'off' / '0' / '1' (chains),
    W (that many candidates at every depth) or W1,W2,... (per depth)."""
    from .errors import MTPDError

    if value is None or value == "auto":
        return value
    text = str(value).strip().lower()
    if text in ("off", "none", "0", "1", "chain"):
        return None
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise MTPDError(f"--tree must be 'auto', 'off', W or W1,W2,... (got {value!r})") from None
    if any(w < 1 or w > MAX_WIDTH for w in widths):
        raise MTPDError(f"--tree widths must be between 1 and {MAX_WIDTH} (got {value!r})")
    return widths


def min_depth(size: int) -> int:
    """The shortest chain with room for a tree of `size` nodes."""
    return max(1, -(-(size - 1) // MAX_WIDTH))


def shape_for(size: int) -> Tuple[int, ...]:
    """A tree of `size` nodes over the shortest chain: alternatives spread over
    its depths, the first ones widest (how step costs by size are measured)."""
    d = min_depth(size)
    alts = size - 1 - d
    return tuple(1 + alts // d + (i < alts % d) for i in range(d))


def widths_for(tree, d: int) -> Optional[Tuple[int, ...]]:
    """A fixed --tree for a d-token chain: a single W applies to every depth, a
    list to the depths it names (1 beyond).  None when it adds nothing."""
    if not tree or tree == "auto" or d <= 0:
        return None
    w = tuple(tree) if len(tree) > 1 else tuple(tree) * d
    w = (w + (1,) * d)[:d]
    return w if any(x > 1 for x in w) else None


def tree_support(model: nn.Module, cache: Sequence) -> Optional[str]:
    """None when trees can be verified through `cache`, else why not (one line)."""
    return tree_support_and_ropes(model, cache)[0]


def tree_support_and_ropes(model: nn.Module, cache: Sequence):
    """(tree_support's answer, the rope owners when trees can be verified)."""
    from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

    from .kvcache import WindowKVCache

    # A rotating (sliding-window) cache holds its entries in order until it wraps,
    # and trees are drafted only before then (DraftState.tree_room): within the
    # window a tree's mask needs no window term; past it, head drafts are chains.
    kinds = {type(c).__name__ for c in cache
             if type(c) not in (KVCache, QuantizedKVCache, RotatingKVCache, WindowKVCache)}
    if kinds:
        return f"its caches ({', '.join(sorted(kinds))}) cannot keep one branch of a tree", None
    ropes = rope_owners(model)
    if len(ropes) != len(cache):
        return "its attention layers do not all take their positions from one rope", None
    return None, ropes


def tree_note(model: nn.Module, heads, tree) -> Optional[str]:
    """One line for the user when trees were asked for (or left on 'auto') but
    this model verifies chains only; None otherwise."""
    if heads is None or tree is None:
        return None
    from mlx_lm.models.cache import make_prompt_cache

    why = tree_support(model, make_prompt_cache(model))
    return f"tree drafts off, chains only: {why}" if why else None


def rope_owners(model: nn.Module) -> List[nn.Module]:
    """The modules whose `rope` gives the attention layers their positions."""
    return [m for _, m in model.named_modules() if isinstance(m, nn.Module) and callable(m.get("rope"))]


@dataclass
class Tree:
    """The verified tokens' layout: node 0 is t_n, nodes 1..d the chain, then
    the alternatives; `alt_nodes[i]` are depth i+1's alternative nodes."""

    d: int
    widths: Tuple[int, ...]
    depth: List[int]
    parent: List[int]
    alt_nodes: List[List[int]]

    @classmethod
    def caterpillar(cls, d: int, widths: Sequence[int]) -> "Tree":
        widths = tuple(widths)
        depth = list(range(d + 1))
        parent = [-1] + list(range(d))
        alt_nodes: List[List[int]] = []
        for i, w in enumerate(widths):
            nodes = []
            for _ in range(w - 1):
                nodes.append(len(depth))
                depth.append(i + 1)
                parent.append(i)
            alt_nodes.append(nodes)
        return cls(d, widths, depth, parent, alt_nodes)

    @property
    def size(self) -> int:
        return len(self.depth)

    @property
    def num_alts(self) -> int:
        return self.size - 1 - self.d

    def mask(self, prefix: int) -> mx.array:
        """(size, prefix + size) bool: every node sees the cached prefix, itself
        and its ancestors."""
        n = self.size
        rows = []
        for i in range(n):
            row = [False] * n
            j = i
            while j >= 0:
                row[j] = True
                j = self.parent[j]
            rows.append(row)
        tree = mx.array(rows)
        if prefix == 0:
            return tree
        return mx.concatenate([mx.ones((n, prefix), mx.bool_), tree], axis=1)

    def rope_layout(self) -> Tuple[mx.array, mx.array, int, int]:
        """Index arrays that lay the nodes out on a (slot, depth) grid, so that one
        rope call over the depth axis gives every node its position
        (offset + depth); (gather, back, slots, depths)."""
        g = max(self.depth) + 1
        slots_used = [0] * g
        back = []
        for dep in self.depth:
            back.append(slots_used[dep] * g + dep)
            slots_used[dep] += 1
        m = max(slots_used)
        gather = [0] * (m * g)  # unused grid cells repeat node 0 (never read back)
        for i, b in enumerate(back):
            gather[b] = i
        return mx.array(gather, mx.uint32), mx.array(back, mx.uint32), m, g


@contextmanager
def tree_attention(model: nn.Module, cache: Sequence, tree: Tree, owners: Optional[List[nn.Module]] = None):
    """While the backbone's forward over the tree's nodes is built: every
    attention layer sees the tree mask and gives each node its depth's position
    (`owners`: `rope_owners(model)`, when already found)."""
    prefix = cache[0].offset
    mask = tree.mask(prefix)
    gather, back, m, g = tree.rope_layout()
    n = tree.size
    owners = rope_owners(model) if owners is None else owners
    saved = [o["rope"] for o in owners]

    def wrap(rope):
        def tree_rope(x, offset=0):
            if x.ndim != 4 or x.shape[2] != n:
                return rope(x, offset=offset)
            b, h, _, dim = x.shape
            y = mx.take(x, gather, axis=2).reshape(b, h, m, g, dim)
            y = rope(y, offset=offset).reshape(b, h, m * g, dim)
            return mx.take(y, back, axis=2)

        return tree_rope

    def make_mask(*args, **kwargs):
        return mask

    try:
        for o, rope in zip(owners, saved):
            o["rope"] = wrap(rope)
        for c in cache:
            c.make_mask = make_mask
        yield
    finally:
        for o, rope in zip(owners, saved):
            o["rope"] = rope
        for c in cache:
            c.__dict__.pop("make_mask", None)


def keep_path(cache: Sequence, prefix: int, size: int, keep: List[int]) -> None:
    """After a tree's verification (the caches hold prefix + size entries), keep
    the accepted path's entries (node indices `keep`, ascending, from 0) in
    order after the prefix and drop the rest."""
    moved = [(i, j) for i, j in enumerate(keep) if i != j]
    for c in cache:
        if moved:
            for name in ("keys", "values"):
                arr = getattr(c, name)
                parts = arr if isinstance(arr, (tuple, list)) else (arr,)
                for a in parts:
                    for i, j in moved:
                        a[..., prefix + i, :] = a[..., prefix + j, :]
        c.trim(size - len(keep))


def alternatives(scores: mx.array, choice: mx.array, k: int) -> mx.array:
    """The k best tokens by `scores` other than `choice`, best first (lazy)."""
    masked = mx.where(mx.arange(scores.shape[-1]) == choice, -mx.inf, scores)
    top = mx.argpartition(-masked, kth=k - 1)[:k] if k < scores.shape[-1] else mx.arange(scores.shape[-1])
    return top[mx.argsort(-masked[top])]


def accept_tree_sampled(tree: Tree, chain: mx.array, chain_q: mx.array, alt_tokens: List[mx.array],
                        logp: mx.array):
    """Multi-candidate speculative sampling over a caterpillar tree, lazily.

    At depth i (reached when c_1..c_{i-1} were accepted), c_i is accepted with
    probability min(1, p(c_i)/q(c_i)); on its rejection the token comes from
    r = norm(max(0, p - q)), which the alternatives (deterministic proposals)
    try in turn: alternative l_j is accepted with probability
    r_j(l_j), r_{j+1} being r_j without l_j, renormalized; when every one is
    rejected the token is sampled from the last residual.  Each step draws from
    the backbone's distribution exactly (recursive rejection sampling).

    Returns (chain_ok (d,), alt_ok (d, m) with the sequential tests folded in,
    fallback (d,) the token after all rejections at each depth, bonus (size,) a
    sample of p at every node); the host walks them (`walk`).
    """
    d = tree.d
    p = mx.exp(logp)
    bonus = mx.random.categorical(logp)
    m = max((len(a) for a in tree.alt_nodes), default=0)
    if d == 0:
        return mx.zeros((0,), mx.bool_), mx.zeros((0, 0), mx.bool_), mx.zeros((0,), mx.uint32), bonus
    idx = mx.arange(d)
    p_rows = p[:d]  # depth i+1 is verified at node i
    p_c = p_rows[idx, chain]
    q_c = chain_q[idx, chain]
    chain_ok = mx.random.uniform(shape=(d,)) * q_c < p_c
    residual = mx.maximum(p_rows - chain_q, 0.0)
    mass = residual.sum(axis=-1, keepdims=True)
    residual = mx.where(mass > 0, residual / mx.maximum(mass, 1e-30), p_rows)
    if m == 0:
        fallback = mx.random.categorical(mx.log(residual))
        return chain_ok, mx.zeros((d, 0), mx.bool_), fallback, bonus
    vocab = logp.shape[-1]
    toks = []
    for i in range(d):  # pad each depth's alternatives to m with its first (never tried twice: masked below)
        a = alt_tokens[i] if i < len(alt_tokens) and alt_tokens[i] is not None else None
        k = 0 if a is None else a.shape[0]
        if k == 0:
            toks.append(mx.zeros((m,), mx.uint32))
        else:
            toks.append(mx.concatenate([a.astype(mx.uint32), mx.repeat(a[:1].astype(mx.uint32), m - k)])
                        if k < m else a.astype(mx.uint32))
    toks = mx.stack(toks)  # (d, m)
    valid = mx.array([[j < len(tree.alt_nodes[i]) for j in range(m)] for i in range(d)])
    r_l = mx.take_along_axis(residual, toks.astype(mx.int32), axis=1)  # (d, m)
    r_l = mx.where(valid, r_l, 0.0)
    before = mx.cumsum(r_l, axis=1) - r_l  # residual mass of the earlier alternatives
    u = mx.random.uniform(shape=(d, m))
    alt_ok = mx.logical_and(valid, u * mx.maximum(1.0 - before, 0.0) < r_l)
    hit = mx.zeros((d, vocab), mx.bool_)
    for j in range(m):
        hit = mx.logical_or(hit, mx.logical_and(mx.arange(vocab)[None] == toks[:, j:j + 1], valid[:, j:j + 1]))
    rest = mx.where(hit, 0.0, residual)
    rest = mx.where(rest.sum(axis=-1, keepdims=True) > 0, rest, residual)
    fallback = mx.random.categorical(mx.log(rest))
    return chain_ok, alt_ok, fallback, bonus


def walk(tree: Tree, chain: List[int], alt_tokens: List[List[int]], chain_ok: List[bool],
         alt_ok: List[List[bool]], fallback: List[int], bonus: List[int]):
    """The accepted path: (tokens to emit, the nodes to keep (from 0), chain
    drafts accepted, the rank (2 = the first alternative) of an accepted
    alternative or 0).  Greedy callers pass chain_ok/alt_ok from comparisons with
    the backbone's argmax and fallback = bonus = the argmax at each node."""
    a = 0
    while a < tree.d and chain_ok[a]:
        a += 1
    keep = list(range(a + 1))
    if a == tree.d:
        return chain[:a] + [bonus[a]], keep, a, 0
    for j, node in enumerate(tree.alt_nodes[a]):
        if alt_ok[a][j]:
            return chain[:a] + [alt_tokens[a][j], bonus[node]], keep + [node], a, j + 2
    return chain[:a] + [fallback[a]], keep, a, 0
