"""The one planner behind every draft source: what to verify next, and how much.

Before every step it weighs the options, each by its expected tokens per
second, against plain decoding (see docs/DESIGN.md, "The planner"):

    E(d) / T(d),  E(d) = 1 + sum_{i<=d} prod_{j<=i} AR_j

- heads (:mod:`mlx_mtpd.heads` drafts, d = 1..max_draft);
- the suffix index's proposal (:mod:`mlx_mtpd.suffix`), any prefix of it.  Its
  acceptance is measured per *match-length bucket* (a 12-token match is not a
  2-token match), so early misses of short matches never hide a long repeat:
  a draft token that extends a match of length L (L + j - 1 at draft position
  j) is accepted with the rate measured for L's bucket, pooled over positions,
  so a copy that goes on drafts further at every step.

For heads, AR_j is measured per draft position (counts decayed so that it
follows the conversation, with a prior of weight 1 that shrinks toward the
previous position's).  T(d) is the measured wall time of a step that drafts d tokens
(interpolated between the lengths measured, and beyond the longest at a prior
slope per drafted token until a longer draft is measured), and T_plain the
measured time per token of plain pipelined decoding.  When no
option pays, it decodes plainly in bursts that end as soon as the context has
a match long enough to pay (the engine checks after every token), and spends
one step every `probe_every` plain tokens re-measuring the best option; the
heads are re-measured every `probe_every` tokens whatever drafted meanwhile.
A planner keeps what it learned across generations (a chat, a server).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

from .errors import MTPDError
from .suffix import MAX_LOOKUP_DRAFT, Proposal, propose

DRAFT_SOURCES = ("heads", "prompt-lookup", "heads+lookup")
MARGIN = 1.02  # `auto` drafts only when it expects at least 2% more tokens per second
# Short matches are common in any text ("of the") and their drafts gain little when right:
# they must promise more (a wrong draft costs a verification, a missed one only a small gain).
SHORT_MATCH_MARGIN = {0: 1.15, 1: 1.08, 2: 1.04}
# Match-length buckets: 2, 3-4, 5-8, 9-16, 17-32, 33+ tokens.
NUM_BUCKETS = 6
# Prior acceptance of a draft token extending a match of each bucket, and its weight.
LOOKUP_PRIOR = [0.3, 0.45, 0.6, 0.75, 0.85, 0.9]
LOOKUP_PRIOR_WEIGHT = 2.0
HEADS_PRIOR = (0.5, 0.9)  # AR_1, and the factor from one position's AR to the next's prior
# Weight (in observations) of a head set's own measured acceptance (its eval.json) as the prior:
# a dozen, so that a few unlucky first steps of a short answer do not shut the heads out
# (the counts decay by 0.97 a step, so the measured ones still dominate after a few dozen).
MEASURED_PRIOR_WEIGHT = 12.0
# Step cost before it is measured, per drafted token, as a fraction of a plain token.
PRIOR_SLOPE = {"heads": 0.25, "lookup": 0.08}
ALWAYS_TRY_MATCH = 12  # a match this long is verified even when history says it will not pay
# Plain bursts go up to this many tokens while no draft is within 10% of plain decoding's speed.
LONG_BURST = 32
NEAR_PAYING = 0.9
RETIME_ADVANTAGE = 1.5  # while drafting beats plain by this much, plain decoding is not re-timed
# Trees (mlx_mtpd.tree): the prior acceptance of a depth's rank-2, 3, 4 candidate when
# the better ones were rejected, and its weight.
RANK_PRIOR = (0.2, 0.1, 0.06)
RANK_PRIOR_WEIGHT = 2.0
# A branch below an alternative is expected, before any is seen, to accept what the
# chain's profile gives after its first token, with the weight of this many tokens
FORK_PRIOR_WEIGHT = 4.0
# Catching the heads up after plain decoding (every depth over every position it
# missed: a head layer's forward each) before it is measured, per position and
# depth, as a fraction of a plain token (this CPU: 0.004-0.006).
CATCH_UP_PRIOR = 0.005
# The catch-up is paid once and serves the steps that follow: a step is charged
# its share over this many steps (fewer when fewer tokens remain).
CATCH_UP_HORIZON = 8
# Sampled drafts are accepted less often than greedy ones: a head set measured
# only greedily is a weaker prior when sampling (the weight of its acceptance).
GREEDY_PRIOR_WEIGHT_WHEN_SAMPLING = 2.0


def match_bucket(match: int) -> int:
    """0 for a 2-token match, 1 for 3-4, 2 for 5-8, 3 for 9-16, 4 for 17-32, 5 beyond."""
    return min(NUM_BUCKETS - 1, max(0, (max(match, 2) - 1).bit_length() - 1))


def parse_num_draft(value) -> Union[int, str, None]:
    """--num-draft: an integer >= 0 or 'auto' (None passes through)."""
    if value is None or value == "auto":
        return value
    try:
        d = int(value)
    except (TypeError, ValueError):
        raise MTPDError(f"--num-draft must be an integer >= 0 or 'auto' (got {value!r})") from None
    if d < 0:
        raise MTPDError(f"--num-draft must be >= 0 (got {d})")
    return d


@dataclass
class ProbeClock:
    """What `auto` counts between its measurements, in tokens emitted.

    Plain decoding is re-timed after `probe_every` drafted tokens, the heads
    re-measured after `probe_every` tokens of anything else, and the best
    draft tried once after `probe_every` plain tokens; the first plain burst
    after loading is not timed (it pays for the warm-up)."""

    plain_since_probe: int = 0  # plain tokens since a draft was last tried
    heads_since: int = 0  # tokens since the heads last drafted
    drafted_since_plain: int = 0  # tokens of drafting steps since plain decoding was last timed
    plain_seen: int = 0  # plain bursts observed

    def drafted(self, kind: str, tokens: int) -> None:
        self.drafted_since_plain += tokens
        self.heads_since = 0 if kind == "heads" else self.heads_since + tokens

    def plain_timed(self, tokens: int) -> None:
        self.plain_seen += 1
        self.heads_since += tokens
        self.drafted_since_plain = 0

    def plain_planned(self, tokens: int) -> None:
        self.plain_since_probe += tokens

    def retimed(self) -> None:
        self.drafted_since_plain = 0

    def probed(self) -> None:
        self.plain_since_probe = 0

    def retime_due(self, every: int) -> bool:
        return self.drafted_since_plain >= every

    def heads_due(self, every: int) -> bool:
        return self.heads_since >= every

    def probe_due(self, every: int) -> bool:
        return self.plain_since_probe >= every

    def until_probe(self, every: int) -> int:
        """Plain tokens until either probe is due."""
        return min(every - self.plain_since_probe, every - self.heads_since)


class DraftPlanner:
    """Chooses each step's draft: its source (heads or the suffix index) and length.

    A fixed `num_draft` drafts that many tokens every step (lookup: up to that
    many, when the context has a match).  `auto` picks, before every step, the
    option with the most expected tokens per second (module docstring); its
    model-free drafts go up to `max_lookup` tokens, its head drafts up to
    `max_draft`.
    """

    def __init__(self, num_draft="auto", source: str = "heads", max_draft: int = 6,
                 burst: int = 8, probe_every: int = 128, decay: float = 0.97, max_lookup: int = MAX_LOOKUP_DRAFT,
                 tree="auto"):
        if source not in DRAFT_SOURCES:
            raise MTPDError(f"unknown draft source {source!r}: choose from {', '.join(DRAFT_SOURCES)}")
        num_draft = parse_num_draft(num_draft)
        self.auto = num_draft == "auto"
        self.num_draft = max_draft if self.auto else num_draft
        self.lookup_cap = max_lookup if self.auto else num_draft
        self.source = source
        self.burst, self.probe_every, self.decay = burst, probe_every, decay
        self.counts: Dict[str, List[List[float]]] = {"heads": []}  # per position: [accepted, reached], decayed
        self.match_counts = [[0.0, 0.0] for _ in range(NUM_BUCKETS)]  # lookup, per bucket: [accepted, reached]
        self.cost: dict = {}  # ("plain", 0): seconds per token; (kind, d): seconds per step
        self._curves: Dict[str, List[Tuple[int, float]]] = {}  # kind -> measured (d, seconds), sorted
        self.clock = ProbeClock()
        self.stop_match: Optional[int] = None  # a plain burst ends at a match this long (None: never)
        self.head_prior: List[float] = []  # AR_j measured beforehand (the head set's evaluation)
        self.head_prior_weight = 1.0
        # the evaluation's AR_j by sampling temperature (0.0: greedy), and the weight of a measured one
        self.head_priors: Dict[float, List[float]] = {}
        self.measured_weight = MEASURED_PRIOR_WEIGHT
        self.temp = 0.0
        # Trees: None (chains), "auto" (the shape chosen per step) or fixed widths per depth.
        self.tree = tree
        self.rank_counts: List[List[List[float]]] = []  # [position][rank - 2] -> [accepted, reached], decayed
        self.rank_prior: List[List[float]] = []  # measured beforehand, [position][rank - 2]
        # branches below depth 1's alternatives: [tokens accepted, tokens the chain's profile
        # expected], decayed; their ratio scales what a fork is expected to add
        self.fork_counts = [0.0, 0.0]
        self.widths: Optional[Tuple[int, ...]] = None  # the tree of the heads step just planned

    def seed(self, acceptance: Optional[List[float]] = None, costs: Optional[dict] = None,
             weight: float = MEASURED_PRIOR_WEIGHT, ranks: Optional[List[List[float]]] = None,
             by_temp: Optional[Dict[float, List[float]]] = None) -> "DraftPlanner":
        """Start from what is already known instead of from nothing.

        `acceptance`: AR_j by draft position measured beforehand (the head set's
        evaluation), the prior of the counts with `weight` observations;
        `costs`: step costs measured on this device (:mod:`mlx_mtpd.costs`):
        {"plain": seconds per token, "heads": {d: seconds}, "lookup": {d: seconds}}.
        Later measurements correct both (the prior is outweighed as counts
        accumulate; costs are moving averages started from these).  `ranks`:
        [position][rank - 2], a tree candidate's acceptance when the better ones
        at its depth were rejected.  `by_temp`: AR_j measured at sampling
        temperatures ({temperature: [AR_1, ...]}); each generation's prior is the
        one measured nearest its temperature (:meth:`set_temp`)."""
        if ranks:
            self.rank_prior = [[min(max(float(x), 0.0), 0.99) for x in row] for row in ranks]
        if acceptance:
            self.measured_weight = weight
        measured = {**(by_temp or {}), **({0.0: acceptance} if acceptance else {})}
        for t, rates in measured.items():
            if rates:
                self.head_priors[float(t)] = [min(max(float(a), 0.0), 0.99) for a in rates]
        if measured:
            self.set_temp(self.temp)
        if costs and costs.get("plain"):
            self.cost[("plain", 0)] = float(costs["plain"])
            for kind in ("heads", "lookup"):
                for d, t in (costs.get(kind) or {}).items():
                    self.cost[(kind, int(d))] = float(t)
            for n, t in (costs.get("tree") or {}).items():  # tree steps by size
                self.cost[("treesize", int(n))] = float(t)
            self._curves.clear()
            self.clock.plain_seen = max(self.clock.plain_seen, 1)  # warm-up is over: the first burst is timed
        return self

    def set_temp(self, temp: float) -> None:
        """The acceptance prior for generations at this temperature: the head
        set's measured at the nearest temperature.  Sampling when only greedy
        decoding was measured keeps it at a small weight (sampled drafts are accepted less
        often: at T = 0.7 the shipped head's AR_1 is about two thirds of greedy)."""
        self.temp = float(temp)
        if not self.head_priors:
            return
        nearest = min(self.head_priors, key=lambda t: (abs(t - self.temp), t))
        self.head_prior = self.head_priors[nearest]
        sampled_from_greedy = self.temp > 0 and not any(t > 0 for t in self.head_priors)
        self.head_prior_weight = (min(GREEDY_PRIOR_WEIGHT_WHEN_SAMPLING, self.measured_weight)
                                  if sampled_from_greedy else self.measured_weight)

    @staticmethod
    def catch_up_work(d: int, lags: Optional[List[int]]) -> int:
        """Positions depths 1..d catch up before a step beyond what a step that
        follows another catches up (up to d + 2 each): the lags (DepthCaches.lags)
        left by plain decoding, or by steps that drafted fewer depths."""
        return sum(max(lag - d - 2, 0) for lag in lags[:d]) if lags else 0

    def catch_up_cost(self, d: int, lags: Optional[List[int]]) -> float:
        """Seconds a d-token heads step spends first catching its depths up."""
        t0 = self.cost.get(("plain", 0))
        work = self.catch_up_work(d, lags)
        if not t0 or not work:
            return 0.0
        return work * self.cost.get(("catchup", 0), CATCH_UP_PRIOR * t0)

    def catch_up_share(self, d: int, lags: Optional[List[int]], remaining: int) -> float:
        """This step's share of the catch-up: the depths caught up serve the steps
        that follow, up to CATCH_UP_HORIZON of them (as many as `remaining`
        tokens allow), so it is spread over those."""
        cost = self.catch_up_cost(d, lags)
        return cost / max(1, min(CATCH_UP_HORIZON, remaining // (d + 1))) if cost else 0.0

    def observe_catch_up(self, d: int, lags: Optional[List[int]], seconds: float, step: Optional[float]) -> None:
        """A d-token heads step with these lags before it took `seconds`, against
        `step` for one that catches nothing up: the cost per position and depth."""
        work = self.catch_up_work(d, lags)
        if step is None or work < 8 or self.cost.get(("plain", 0)) is None:
            return
        per = max(seconds - step, 0.0) / work
        self._ema(("catchup", 0), min(per, 0.2 * self.cost[("plain", 0)]))

    def prefill_depth(self) -> int:
        """How many head depths to catch up inside the prefill: those the first
        drafting step is expected to use (all of a fixed D; under `auto`, the
        best length by what the planner knows, 0 while it knows no costs or when
        the heads are not expected to pay)."""
        if not self.uses_heads:
            return 0
        if not self.auto:
            return self.num_draft
        t0 = self.cost.get(("plain", 0))
        if t0 is None:
            return 0
        rate, d, _ = self._best_heads(self.num_draft, self.tree is not None)
        return d if rate * t0 > MARGIN / 1.1 else 0  # near paying: the heads will be tried soon

    @property
    def uses_heads(self) -> bool:
        return self.source != "prompt-lookup" and self.num_draft > 0

    @property
    def uses_lookup(self) -> bool:
        return self.source != "heads"

    # -- estimates --------------------------------------------------------------
    def match_acceptance(self, match: int) -> float:
        """Acceptance of a draft token that extends a match of this length."""
        b = match_bucket(match)
        a, r = self.match_counts[b]
        return (a + LOOKUP_PRIOR_WEIGHT * LOOKUP_PRIOR[b]) / (r + LOOKUP_PRIOR_WEIGHT)

    def profile(self, kind: str, d: int, match: int = 0) -> List[float]:
        """AR_1..AR_d: for heads, measured per position with a prior of weight 1;
        for lookup, position j extends a match of length match + j - 1."""
        if kind != "heads":
            by_bucket = [self.match_acceptance(lo) for lo in (2, 3, 5, 9, 17, 33)]
            return [by_bucket[match_bucket(match + j)] for j in range(d)]
        prior, shrink = HEADS_PRIOR
        c = self.counts["heads"]
        out = []
        for j in range(d):
            a, r = c[j] if j < len(c) else (0.0, 0.0)
            if j < len(self.head_prior):
                w = self.head_prior_weight
                ar = (a + w * self.head_prior[j]) / (r + w)
            else:
                ar = (a + prior) / (r + 1)
            out.append(ar)
            prior = shrink * ar
        return out

    def acceptance(self, kind: str, j: int, match: int = 0) -> float:
        """AR_j (1-based)."""
        return self.profile(kind, j, match)[-1]

    def expected(self, kind: str, d: int, match: int = 0) -> float:
        e, p = 1.0, 1.0
        for ar in self.profile(kind, d, match):
            p *= ar
            e += p
        return e

    # -- trees (mlx_mtpd.tree) ------------------------------------------------------
    def rank_table(self, d: int) -> List[List[float]]:
        """[position j][rank - 2]: the acceptance of depth j+1's rank-r candidate
        when the better ones at that depth were rejected.  Counted per position
        and rank, with a prior of weight 2 at the rate pooled over positions
        (itself with a prior: the head set's measured one, else RANK_PRIOR)."""
        from .tree import MAX_WIDTH

        ranks = MAX_WIDTH - 1
        pooled = []
        for k in range(ranks):
            a = sum(row[k][0] for row in self.rank_counts)
            n = sum(row[k][1] for row in self.rank_counts)
            pooled.append((a, n))
        table = []
        for j in range(d):
            row = []
            for k in range(ranks):
                src = self.rank_prior[min(j, len(self.rank_prior) - 1)] if self.rank_prior else ()
                base = src[k] if k < len(src) else RANK_PRIOR[k]
                pa, pn = pooled[k]
                mean = (pa + RANK_PRIOR_WEIGHT * base) / (pn + RANK_PRIOR_WEIGHT)
                a, n = self.rank_counts[j][k] if j < len(self.rank_counts) else (0.0, 0.0)
                row.append((a + RANK_PRIOR_WEIGHT * mean) / (n + RANK_PRIOR_WEIGHT))
            table.append(row)
        return table

    @staticmethod
    def expected_tree(profile: List[float], widths, table: List[List[float]]) -> float:
        """Tokens per step of a caterpillar tree: at depth j, reached when the chain
        drafts before it were accepted, its chain draft or one of its
        alternatives is accepted (an alternative ends the step)."""
        e, reach = 1.0, 1.0
        for j, ar in enumerate(profile):
            w = widths[j] if j < len(widths) else 1
            miss = 1.0
            for r in range(2, w + 1):
                miss *= 1.0 - table[j][r - 2]
            e += reach * (ar + (1.0 - ar) * (1.0 - miss))
            reach *= ar
        return e

    def tree_cost(self, d: int, size: int) -> Optional[float]:
        """Seconds of a head step that verifies a tree of `size` nodes over a
        d-token chain, or None for a size not measured (when some are).

        Measured (mlx_mtpd.costs): one tree step per size, over the shortest
        chain that has room for it; a d-token chain adds what its chain step
        costs beyond that one's (a verification's cost need not grow with its
        length: CPU BLAS kernels favour some row counts, so only measured sizes
        are used).  Observed tree steps scale the result.  Unmeasured: the
        chain's cost plus the lookup steps' slope per extra token, a fifth more
        for the tree mask."""
        from .tree import min_depth

        base = self.step_cost("heads", d)
        if base is None:
            return None
        if size <= d + 1:
            return base
        scale = self.cost.get(("tree", 0), 1.0)
        measured = {n: t for (k, n), t in self.cost.items() if k == "treesize"}
        if measured:
            t = measured.get(size)
            if t is None:
                return None
            return scale * (t + base - self.step_cost("heads", min_depth(size)))
        lo, hi = self.step_cost("lookup", 2), self.step_cost("lookup", 8)
        slope = 1.2 * max((hi - lo) / 6, 0.02 * self.cost[("plain", 0)])
        return scale * (base + (size - d - 1) * slope)

    def best_tree(self, d: int, profile: List[float], table: List[List[float]], extra: float = 0.0):
        """(tokens per second, widths or None) of the best tree over a d-token
        chain.  Alternatives are added best first: the next one at depth j
        (rank w_j + 1) adds reach_j (1 - AR_j) prod_{r<=w_j}(1 - b_{j,r}) b_{j,w_j+1}
        expected tokens, so each tree size has its best shape; each shape with
        alternatives at depth 1 is also tried with a fork (`best_fork`); the size
        is then chosen by tokens per second against its measured cost (plus
        `extra` seconds: the heads' catch-up)."""
        from .tree import MAX_TREE_SIZE, MAX_WIDTH

        base = self.step_cost("heads", d) + extra
        widths = [1] * d
        reach, r = [], 1.0
        for ar in profile:
            reach.append(r)
            r *= ar
        e = self.expected_tree(profile, widths, table)
        best, best_widths = e / base, None
        miss = [1.0] * d  # prod (1 - b) over the ranks tried at depth j
        fork_price = None  # what best_fork needs, found once
        for n in range(1, MAX_TREE_SIZE - d):
            gain, j = max(((reach[j] * (1.0 - profile[j]) * miss[j] * table[j][widths[j] - 1], j)
                           for j in range(d) if widths[j] < MAX_WIDTH), default=(0.0, -1))
            if j < 0 or gain <= 0:
                break
            miss[j] *= 1.0 - table[j][widths[j] - 1]
            widths[j] += 1
            e += gain
            cost = self.tree_cost(d, 1 + d + n)  # None: a size not measured
            if cost and e / (cost + extra) > best:
                best, best_widths = e / (cost + extra), tuple(widths)
            if widths[0] > 1:
                if fork_price is None:
                    a, x = self.fork_counts
                    fork_price = ((a + FORK_PRIOR_WEIGHT) / (x + FORK_PRIOR_WEIGHT), self.head_depth_cost())
                rate, shape = self.best_fork(d, widths, e, profile, 1.0 - miss[0], *fork_price, extra)
                if rate > best:
                    best, best_widths = rate, shape
        return best, best_widths

    def best_fork(self, d: int, widths: List[int], e: float, profile: List[float], alt_hit: float,
                  scale: float, depth: float, extra: float = 0.0):
        """(tokens per second, Widths) of the best fork F = 1..d-1 below depth 1's
        alternatives of the tree `widths` (expecting `e` tokens without a fork;
        depth 1's alternatives are accepted in `alt_hit` of the chain's misses
        there), or (0.0, None).  A branch of F tokens is expected to add what
        the chain's profile gives after its first token, times `scale` (what
        branches were seen to accept against that: `fork_counts`); the branches
        cost their tree size's measured verification and F head calls of
        `depth` seconds each."""
        from .tree import MAX_TREE_SIZE, Widths, tree_size

        best = (0.0, None)
        for f, branch in enumerate(self.after_first(profile), start=1):
            shape = Widths(widths, f)
            size = tree_size(shape)
            if size > MAX_TREE_SIZE:
                break
            cost = self.tree_cost(d, size)
            if not cost:
                continue
            rate = (e + (1.0 - profile[0]) * alt_hit * scale * branch) / (cost + f * depth + extra)
            if rate > best[0]:
                best = (rate, shape)
        return best

    @staticmethod
    def after_first(profile: List[float]) -> List[float]:
        """Expected tokens accepted in a branch of 1, 2, ... tokens below an
        accepted alternative: what the chain's profile gives from its second
        position on."""
        out, e, p = [], 0.0, 1.0
        for ar in profile[1:]:
            p *= ar
            e += p
            out.append(e)
        return out

    def head_depth_cost(self) -> float:
        """Seconds of one more head depth in a step, less the verification of
        its token: the heads' step-cost slope less the lookup steps' per token."""
        h1, h2 = self.step_cost("heads", 1), self.step_cost("heads", 2)
        lo, hi = self.step_cost("lookup", 2), self.step_cost("lookup", 8)
        if None in (h1, h2, lo, hi):
            return 0.0
        return max(h2 - h1 - max(hi - lo, 0.0) / 6, 0.0)

    def _best_heads(self, cap: int, trees: bool,
                    lags: Optional[List[int]] = None,
                    remaining: int = 0) -> Tuple[float, int, Optional[Tuple[int, ...]]]:
        """(tokens per second, d, widths) of the best head draft up to `cap` tokens,
        the depths lagging by `lags` (see catch_up_share; `remaining` tokens)."""
        if not trees or self.tree != "auto":
            rate, d = self._best_length("heads", cap, lags=lags, remaining=remaining)
            return rate, d, None
        profile = self.profile("heads", cap)
        table = self.rank_table(cap)
        best = (0.0, 0, None)
        for d in range(1, cap + 1):
            rate, widths = self.best_tree(d, profile[:d], table, self.catch_up_share(d, lags, remaining))
            if rate > best[0]:
                best = (rate, d, widths)
        return best

    def fixed_widths(self, d: int, trees: bool) -> Optional[Tuple[int, ...]]:
        """The tree over a fixed d-token chain: --tree's widths, or under --tree
        auto the best shape by what the planner knows."""
        if not trees or not self.tree:
            return None
        if self.tree == "auto":
            if self.cost.get(("plain", 0)) is None:
                return None
            return self.best_tree(d, self.profile("heads", d), self.rank_table(d))[1]
        from .tree import widths_for

        return widths_for(self.tree, d)

    def observe_tree(self, d: int, widths, a_chain: int, rank: int, seconds: Optional[float],
                     accepted: Optional[int] = None) -> None:
        """A tree step: the alternatives tried at the depth where the chain
        stopped (each rank up to the accepted one), the cost per alternative, and
        with a fork that went down a branch (`accepted`: tokens accepted in the
        step), what the branch accepted against what the profile expected."""
        from .tree import MAX_WIDTH, fork_of, tree_size

        for row in self.rank_counts:
            for c in row:
                c[0] *= self.decay
                c[1] *= self.decay
        fork = fork_of(widths)
        if fork and rank and a_chain == 0 and accepted is not None:
            expected = self.after_first(self.profile("heads", fork + 1))[-1]
            self.fork_counts = [self.fork_counts[0] * self.decay + max(accepted - 1, 0),
                                self.fork_counts[1] * self.decay + expected]
        if a_chain < d and widths[a_chain] > 1:
            while len(self.rank_counts) <= a_chain:
                self.rank_counts.append([[0.0, 0.0] for _ in range(MAX_WIDTH - 1)])
            row = self.rank_counts[a_chain]
            top = rank if rank else widths[a_chain]
            for r in range(2, top + 1):
                row[r - 2][1] += 1
                row[r - 2][0] += r == rank
        size = tree_size(widths)
        if seconds is not None and size > d + 1:
            # None: no plain timing yet, or a size not measured (a fixed --tree shape)
            predicted = self.tree_cost(d, size)
            if predicted:
                predicted /= self.cost.get(("tree", 0), 1.0)
                if fork:  # the branches' head calls are not verification
                    seconds -= fork * self.head_depth_cost()
                self._ema(("tree", 0), min(max(seconds / predicted, 0.5), 3.0))

    def step_cost(self, kind: str, d: int) -> Optional[float]:
        """T(d): the measured step times of this kind, interpolated piecewise
        linearly between the lengths measured (from one plain token at d = 0),
        and beyond the longest at the prior slope per drafted token; before any
        measurement, the prior line (pessimistic)."""
        t0 = self.cost.get(("plain", 0))
        if t0 is None:
            return None
        pts = self._curves.get(kind)
        if pts is None:
            pts = sorted((dd, t) for (k, dd), t in self.cost.items() if k == kind and dd > 0)
            for i in range(1, len(pts)):  # a longer draft never costs less to verify
                pts[i] = (pts[i][0], max(pts[i][1], pts[i - 1][1]))
            self._curves[kind] = pts
        slope = PRIOR_SLOPE[kind] * t0
        if not pts:
            return t0 + slope * d
        lo = (0, t0)
        for hi in pts:
            if d <= hi[0]:
                return max(t0, lo[1] + (hi[1] - lo[1]) * (d - lo[0]) / (hi[0] - lo[0]))
            lo = hi
        return max(t0, lo[1] + slope * (d - lo[0]))

    @property
    def plain_tokens_per_s(self) -> Optional[float]:
        t0 = self.cost.get(("plain", 0))
        return 1.0 / t0 if t0 else None

    def _ema(self, key, value: float) -> None:
        old = self.cost.get(key)
        self.cost[key] = value if old is None else 0.8 * old + 0.2 * value
        self._curves.pop(key[0], None)

    def observe(self, kind: str, d: int, accepted: int, seconds: Optional[float], match: int = 0) -> None:
        if seconds is not None:
            self._ema((kind, d), seconds)
        self.clock.drafted(kind, accepted + 1)
        if kind != "heads":
            for c in self.match_counts:
                c[0] *= self.decay
                c[1] *= self.decay
            for j in range(min(accepted + 1, d)):  # the positions verified: all up to the first rejection
                c = self.match_counts[match_bucket(match + j)]
                c[1] += 1
                c[0] += j < accepted
            return
        c = self.counts["heads"]
        while len(c) < d:
            c.append([0.0, 0.0])
        for j in range(len(c)):
            c[j][0] *= self.decay
            c[j][1] *= self.decay
        for i in range(d):
            if i <= accepted:
                c[i][1] += 1
            if i < accepted:
                c[i][0] += 1

    def observe_plain(self, tokens: int, seconds: float) -> None:
        self.clock.plain_timed(tokens)
        if tokens >= 2 and self.clock.plain_seen > 1:  # the first burst after loading pays for warm-up
            self._ema(("plain", 0), seconds / tokens)

    def _best_length(self, kind: str, cap: int, match: int = 0,
                     lags: Optional[List[int]] = None, remaining: int = 0) -> Tuple[float, int]:
        """(tokens per second, d) of the best draft length up to `cap` (for heads
        lagging by `lags`, their catch-up's share counted in the step's cost)."""
        best, best_d, e, p = 0.0, 0, 1.0, 1.0
        for d, ar in enumerate(self.profile(kind, cap, match), 1):
            p *= ar
            e += p
            rate = e / (self.step_cost(kind, d) + (self.catch_up_share(d, lags, remaining) if kind == "heads" else 0.0))
            if rate > best:
                best, best_d = rate, d
        return best, best_d

    def useful_match(self) -> Optional[int]:
        """The shortest match worth verifying now (ends a plain burst), None before timing."""
        if self.cost.get(("plain", 0)) is None or not self.uses_lookup or self.lookup_cap <= 0:
            return None
        t0 = self.cost[("plain", 0)]
        for lo in (2, 3, 5, 9, 17, 33):  # the shortest match of each bucket
            if lo >= ALWAYS_TRY_MATCH:
                break
            if self._best_length("lookup", self.lookup_cap, lo)[0] > self._margin("lookup", lo) / t0:
                return lo
        return ALWAYS_TRY_MATCH

    # -- the choice -------------------------------------------------------------
    def plan(self, st, remaining: int):
        """('plain', n tokens, why) or ('heads', d, why) or ('lookup', Proposal, why);
        for a heads step, `self.widths` is its tree (None: a chain)."""
        self.widths = None
        cap = min(self.num_draft, remaining - 1)
        lcap = min(self.lookup_cap, remaining - 1)
        index = getattr(st, "index", None)
        lookup = Proposal([], 0)
        if self.uses_lookup and lcap > 0 and index is not None:
            lookup = propose(index, lcap, getattr(st, "memory", None))
        heads_ok = self.uses_heads and st.max_depth > 0 and cap > 0
        trees = self.tree is not None and getattr(st, "tree_reason", "") is None
        if heads_ok and not st.can_verify(cap):
            return "plain", remaining if self.auto else 1, "a cache that cannot take this draft back: plain decoding"
        if lookup.tokens and not st.can_verify(len(lookup)):
            lookup = Proposal([], 0)
        if not self.auto:
            if lookup.tokens and (not heads_ok or self.expected("lookup", len(lookup), lookup.match)
                                  >= self.expected("heads", cap)):
                return "lookup", lookup, None
            if heads_ok:
                self.widths = self.fixed_widths(cap, trees)
                return "heads", cap, None
            return "plain", 1 if self.uses_lookup else remaining, None
        t0 = self.cost.get(("plain", 0))
        if t0 is None:
            return self._plain(remaining)
        options = []  # (rate, kind, arg)
        widths = None
        if heads_ok:
            # what the depths missed (plain decoding, shorter drafts) is caught up first
            lags = st.depths.lags(st.length) if hasattr(st, "depths") else None
            rate, d, widths = self._best_heads(min(cap, st.max_depth), trees, lags, remaining)
            options.append((rate, "heads", d))
        lookup_option = None
        if lookup.tokens:
            rate, d = self._best_length("lookup", len(lookup), lookup.match)
            lookup_option = (rate, "lookup", lookup[:d])
            options.append(lookup_option)
        rate, kind, arg = max(options, key=lambda o: o[0], default=(0.0, "plain", None))
        if self.clock.retime_due(self.probe_every) and rate * t0 < RETIME_ADVANTAGE * MARGIN:
            # time plain decoding again now and then while drafting: the yardstick
            # drifts (context length, other load on the machine); not while drafting
            # clearly wins, as in a long repeat
            self.clock.retimed()
            return self._plain(remaining)
        # Drafting must beat plain decoding by a margin: timings are noisy, and a
        # wrong "draft" costs speed while a wrong "plain" costs only a missed gain.
        # A long match is tried whatever the history (a repeat must be drafted),
        # and one step every probe_every plain tokens re-measures the best option.
        pays = rate > self._margin(kind, lookup.match) / t0
        if not pays and lookup_option is not None and lookup.match >= ALWAYS_TRY_MATCH:
            _, kind, arg = lookup_option
            pays = True
        if (heads_ok and kind != "heads" and self.clock.heads_due(self.probe_every)
                and (not pays or rate * t0 < RETIME_ADVANTAGE * MARGIN)):
            # the heads are measured again every probe_every tokens whatever else
            # drafts meanwhile: one unlucky step must not shut them out for good
            # (lookup steps that pay would otherwise keep postponing the probe)
            self.clock.probed()
            self.widths = widths
            return "heads", options[0][2], None
        if pays or (options and self.clock.probe_due(self.probe_every)):
            self.clock.probed()
            if kind == "heads":
                self.widths = widths
            return kind, arg, None
        return self._plain(remaining, far=rate * t0 < NEAR_PAYING)

    @staticmethod
    def _margin(kind: str, match: int = 0) -> float:
        return SHORT_MATCH_MARGIN.get(match_bucket(match), MARGIN) if kind == "lookup" else MARGIN

    def _plain(self, remaining: int, far: bool = False):
        """A plain burst: `burst` tokens, or up to LONG_BURST when no draft is near
        paying (`far`): every burst restarts mlx-lm-style pipelining with one
        forward the host builds unoverlapped, and nothing is lost by going on, since
        a burst ends anyway at a useful match and at the next probe."""
        n = self.burst
        if far:
            n = max(n, min(LONG_BURST, self.clock.until_probe(self.probe_every)))
        n = min(n, remaining)
        self.clock.plain_planned(n)
        self.stop_match = self.useful_match()
        return "plain", n, None
