"""Tree drafts: several candidates per draft position, verified by the backbone
in one forward with a tree attention mask and per-node positions (docs/DESIGN.md,
"Tree drafts").

The tree the heads propose is the chain they draft today, c_1..c_d, with each
depth's next-best candidates hung beside it: at depth i, `widths[i-1] - 1`
alternatives to c_i, children of c_{i-1} (the root, t_n, for depth 1).  With a
`fork` F (`--tree 4/2`), each of depth 1's alternatives is continued by the
heads for F more tokens, a branch of its own (`head_drafts.fork_drafts`).  The
nodes go to the backbone chain first, then the alternatives depth by depth,
then the branches' continuations, branch by branch:

    [t_n, c_1, ..., c_d, alts of depth 1, alts of depth 2, ..., branch 1, branch 2, ...]

so an accepted chain prefix is a prefix of the verified tokens (its cache
entries are kept by a trim, as for a chain) and only a path that leaves the
chain moves cache entries.  An alternative without a branch has no children:
when it is accepted, the backbone's token at it is the bonus token and the
step ends there.  Without forks the heads draft nothing more than for a chain
(their top candidates at each depth come from logits they compute anyway), so
such a tree costs only the verification of its extra tokens; a fork costs F
more head calls, all branches together.

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
from dataclasses import dataclass, field
from functools import cached_property
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn

# A tree has at most this many candidates per depth (the chain's and its alternatives),
# and at most this many nodes (t_n included).
MAX_WIDTH = 4
MAX_TREE_SIZE = 16


class Widths(tuple):
    """Candidates per depth, and `fork`: how many more tokens the heads draft
    after each of depth 1's alternatives (0: the alternatives are leaves)."""

    def __new__(cls, widths, fork: int = 0):
        obj = super().__new__(cls, widths)
        obj.fork = fork
        return obj

    def __repr__(self) -> str:
        return f"{tuple(self)!r}/{self.fork}" if self.fork else repr(tuple(self))


def fork_of(widths) -> int:
    return getattr(widths, "fork", 0) if widths else 0


def tree_size(widths) -> int:
    """Nodes of the tree these widths draw (t_n included)."""
    return 1 + sum(widths) + (widths[0] - 1) * fork_of(widths) if widths else 1


def shape_name(widths) -> str:
    """'4-2-1', or '4-1-1/2' with a fork: how results name a tree's shape."""
    return "-".join(map(str, widths)) + (f"/{fork_of(widths)}" if fork_of(widths) else "")


def parse_tree(value) -> Optional[object]:
    """--tree: 'auto' (the planner chooses the shape), 'off' / '0' / '1' (chains),
    W (that many candidates at every depth) or W1,W2,... (per depth), either
    followed by /F: depth 1's alternatives each continued for F more tokens."""
    from .errors import MTPDError

    if value is None or value == "auto":
        return value
    text = str(value).strip().lower()
    if text in ("off", "none", "0", "1", "chain"):
        return None
    spec, _, fork = text.partition("/")
    try:
        widths = tuple(int(w) for w in spec.split(","))
        fork = int(fork) if fork else 0
    except ValueError:
        raise MTPDError(f"--tree must be 'auto', 'off', W, W1,W2,... or either with /F (got {value!r})") from None
    if any(w < 1 or w > MAX_WIDTH for w in widths):
        raise MTPDError(f"--tree widths must be between 1 and {MAX_WIDTH} (got {value!r})")
    if fork < 0 or (fork and widths[0] < 2):
        raise MTPDError(f"--tree W/F forks depth 1's alternatives: W must be 2 or more and F 0 or more "
                        f"(got {value!r})")
    return Widths(widths, fork) if fork else widths


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
    list to the depths it names (1 beyond); a fork is at most d - 1 tokens (a
    branch reaches no deeper than the chain), and the tree at most
    MAX_TREE_SIZE nodes (the fork shortened to fit).  None when it adds nothing."""
    if not tree or tree == "auto" or d <= 0:
        return None
    w = tuple(tree) if len(tree) > 1 else tuple(tree) * d
    w = (w + (1,) * d)[:d]
    if not any(x > 1 for x in w):
        return None
    fork = min(fork_of(tree), d - 1)
    while fork and tree_size(Widths(w, fork)) > MAX_TREE_SIZE:
        fork -= 1
    return Widths(w, fork) if fork else w


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
    the alternatives (`alt_nodes[i]`: depth i+1's), then the branches that
    continue depth 1's alternatives (`branch_nodes[j]`: the j-th alternative's
    continuation, deepest last)."""

    d: int
    widths: Tuple[int, ...]
    depth: List[int]
    parent: List[int]
    alt_nodes: List[List[int]]
    branch_nodes: List[List[int]] = field(default_factory=list)

    @classmethod
    def caterpillar(cls, d: int, widths: Sequence[int]) -> "Tree":
        """The chain with each depth's alternatives beside it, and the branches
        of `widths`' fork (`Widths`) below depth 1's."""
        fork = fork_of(widths)
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
        branch_nodes: List[List[int]] = []
        for alt in (alt_nodes[0] if fork and alt_nodes else []):
            nodes, up = [], alt
            for k in range(fork):
                nodes.append(len(depth))
                depth.append(2 + k)
                parent.append(up)
                up = nodes[-1]
            branch_nodes.append(nodes)
        return cls(d, widths, depth, parent, alt_nodes, branch_nodes)

    @property
    def size(self) -> int:
        return len(self.depth)

    @property
    def num_alts(self) -> int:
        return self.size - 1 - self.d

    @cached_property
    def children(self) -> List[List[int]]:
        """Each node's children, the one drafted from q first (the chain's next
        draft, or a branch's), then the alternatives best first."""
        kids: List[List[int]] = [[] for _ in range(self.size)]
        for node in range(1, self.size):
            kids[self.parent[node]].append(node)
        return kids

    @cached_property
    def decision_nodes(self) -> List[int]:
        """The nodes with children, in order: where the walk chooses."""
        return [x for x, k in enumerate(self.children) if k]

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


def accept_tree_sampled(tree: Tree, tokens: mx.array, first_q: mx.array, logp: mx.array):
    """Multi-candidate speculative sampling over a tree, lazily.

    At every node with children (reached when the path to it was accepted),
    its first child (drafted from q: the chain's next draft, or a branch's) is
    accepted with probability min(1, p(c)/q(c)); on its rejection the token
    must come from r = norm(max(0, p - q)), which the other children (the
    alternatives: deterministic proposals) try in turn: alternative l_j is
    accepted with probability r_j(l_j), r_{j+1} being r_j without l_j,
    renormalized; when every one is rejected the token is sampled from the last
    residual.  Each step draws from the backbone's distribution exactly
    (recursive rejection sampling), and a branch below an accepted alternative
    goes on the same way: its drafts were sampled from their own q, given the
    alternative, whatever the tests above them drew.

    `tokens` (size,): the nodes; `first_q` (R, vocab): the q of the first child
    of each node with children, in node order (`Tree.decision_nodes`).  Returns
    (ok (R,), alt_ok (R, m) with the sequential tests folded in, fallback (R,)
    the token after all rejections at each such node, bonus (size,) a sample of
    p at every node); the host walks them (`walk`).
    """
    kids, rows = tree.children, tree.decision_nodes
    p = mx.exp(logp)
    bonus = mx.random.categorical(logp)
    if not rows:
        return mx.zeros((0,), mx.bool_), mx.zeros((0, 0), mx.bool_), mx.zeros((0,), mx.uint32), bonus
    n = len(rows)
    p_rows = p[mx.array(rows, mx.uint32)]
    first = tokens[mx.array([kids[x][0] for x in rows], mx.uint32)].astype(mx.int32)[:, None]
    p_c = mx.take_along_axis(p_rows, first, axis=1)[:, 0]
    q_c = mx.take_along_axis(first_q, first, axis=1)[:, 0]
    ok = mx.random.uniform(shape=(n,)) * q_c < p_c
    residual = mx.maximum(p_rows - first_q, 0.0)
    mass = residual.sum(axis=-1, keepdims=True)
    residual = mx.where(mass > 0, residual / mx.maximum(mass, 1e-30), p_rows)
    m = max(len(kids[x]) - 1 for x in rows)
    if m == 0:
        fallback = mx.random.categorical(mx.log(residual))
        return ok, mx.zeros((n, 0), mx.bool_), fallback, bonus
    vocab = logp.shape[-1]
    # each node's alternatives, padded to m with its first child (never tested: masked below)
    alt_idx = [[kids[x][1 + j] if 1 + j < len(kids[x]) else kids[x][0] for j in range(m)] for x in rows]
    toks = tokens[mx.array(alt_idx, mx.uint32)].astype(mx.int32)  # (R, m)
    valid = mx.array([[1 + j < len(kids[x]) for j in range(m)] for x in rows])
    r_l = mx.take_along_axis(residual, toks, axis=1)
    r_l = mx.where(valid, r_l, 0.0)
    before = mx.cumsum(r_l, axis=1) - r_l  # residual mass of the earlier alternatives
    u = mx.random.uniform(shape=(n, m))
    alt_ok = mx.logical_and(valid, u * mx.maximum(1.0 - before, 0.0) < r_l)
    hit = mx.zeros((n, vocab), mx.bool_)
    for j in range(m):
        hit = mx.logical_or(hit, mx.logical_and(mx.arange(vocab)[None] == toks[:, j:j + 1], valid[:, j:j + 1]))
    rest = mx.where(hit, 0.0, residual)
    rest = mx.where(rest.sum(axis=-1, keepdims=True) > 0, rest, residual)
    fallback = mx.random.categorical(mx.log(rest))
    return ok, alt_ok, fallback, bonus


def greedy_outcome(tree: Tree, tokens: List[int], target: List[int]):
    """`walk`'s inputs for greedy decoding: a child is accepted when it is the
    backbone's argmax at its parent; the fallback and the bonus are the argmax."""
    kids, rows = tree.children, tree.decision_nodes
    ok = [tokens[kids[x][0]] == target[x] for x in rows]
    alt_ok = [[tokens[k] == target[x] for k in kids[x][1:]] for x in rows]
    return ok, alt_ok, [target[x] for x in rows], target


def walk(tree: Tree, tokens: List[int], ok: List[bool], alt_ok: List[List[bool]], fallback: List[int],
         bonus: List[int]):
    """The accepted path from the root: at each node its first child when
    accepted, else its first accepted alternative, else the fallback token ends
    the step (at a leaf, the bonus token).  Returns (tokens to emit, the nodes
    to keep (from 0, ascending), chain drafts accepted, the rank (2 = the first
    alternative) of the alternative where the path left the chain, or 0)."""
    kids = tree.children
    row = {x: r for r, x in enumerate(tree.decision_nodes)}
    x, path, out = 0, [0], []
    while True:
        if not kids[x]:
            out.append(bonus[x])
            break
        r = row[x]
        nxt = kids[x][0] if ok[r] else next((k for j, k in enumerate(kids[x][1:]) if alt_ok[r][j]), None)
        if nxt is None:
            out.append(fallback[r])
            break
        out.append(tokens[nxt])
        path.append(nxt)
        x = nxt
    a_chain = sum(1 for node in path if 1 <= node <= tree.d)
    rank = 0
    if a_chain + 1 < len(path):  # the path left the chain after a_chain drafts
        node = path[a_chain + 1]
        rank = kids[tree.parent[node]].index(node) + 1
    return out, path, a_chain, rank
