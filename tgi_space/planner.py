"""The planner: which tree nodes and mask groups each sequence sends, from the measured cost of rows.

Per step the engine pays t(N) for N query rows in all. A node is worth its survival
score (the chance verification reaches it, i.e. one more emitted token); a mask group
anchored at node u is worth P(u is the last accepted node) times what mask drafts
add next step. The planner takes items best-worth-per-row first and keeps the
prefix that maximises expected tokens per second, (num_sequences + sum of values) /
t(rows). When nothing pays for its rows the step is exactly plain decoding.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from tgi_space.tree import ROOT, DraftTree


class LatencyCurve:
    """t(N) in seconds from a few measured points: made monotone, interpolated, extrapolated linearly."""

    def __init__(self, points: dict[int, float]) -> None:
        if not points or min(points) < 1:
            raise ValueError("latency curve: need measured points for N >= 1")
        self.rows = sorted(points)
        running, self.seconds = 0.0, []
        for n in self.rows:  # monotone: more rows never cost less
            running = max(running, points[n])
            self.seconds.append(running)

    def __call__(self, rows: int, num_seqs: int = 1) -> float:
        """t(rows); the batch size is ignored (see LatencySurface)."""
        rs, ts = self.rows, self.seconds
        if rows <= rs[0]:
            return ts[0]
        i = bisect.bisect_left(rs, rows)
        if i == len(rs):
            i -= 1
        n0, n1, t0, t1 = rs[i - 1], rs[i], ts[i - 1], ts[i]
        return t0 + (t1 - t0) * (rows - n0) / (n1 - n0)

    def as_dict(self) -> dict[int, float]:
        """The monotone points, milliseconds."""
        return {n: 1000 * t for n, t in zip(self.rows, self.seconds)}


class LatencySurface:
    """t(rows, num_seqs): a monotone curve per measured batch size, linear in the batch size between them.

    One sequence's 20 extra rows cost more inside a batch of 16 than alone (attention over 16
    prefixes, padding within a group), so the cost of a row is read at the step's own batch size.
    """

    def __init__(self, curves: dict[int, LatencyCurve]) -> None:
        self.sizes = sorted(curves)
        self.curves = curves

    def __call__(self, rows: int, num_seqs: int = 1) -> float:
        sizes = self.sizes
        if num_seqs <= sizes[0] or len(sizes) == 1:
            return self.curves[sizes[0]](rows)
        if num_seqs >= sizes[-1]:
            return self.curves[sizes[-1]](rows)
        i = bisect.bisect_left(sizes, num_seqs)
        b0, b1 = sizes[i - 1], sizes[i]
        t0, t1 = self.curves[b0](rows), self.curves[b1](rows)
        return t0 + (t1 - t0) * (num_seqs - b0) / (b1 - b0)

    def as_dict(self) -> dict[int, dict[int, float]]:
        """{batch size: {rows: ms}}."""
        return {b: c.as_dict() for b, c in self.curves.items()}


@dataclass
class Proposal:
    """What one sequence could send this step."""

    base_rows: int  # its uncached tokens: always sent
    tree: DraftTree  # scored candidates (may be empty)
    group_size: int  # rows of a mask group at most (0: this sequence gets none)
    mask_value: float  # expected extra tokens next step from mask drafts of a group of group_size rows
    # ... and of a group of 1, 2, ... rows, when smaller groups may be sent (empty: group_size rows only)
    mask_values: tuple[float, ...] = ()
    # what each tree node is worth (its chance to be reached, as calibrated); empty: the tree's scores
    survival: tuple[float, ...] = ()

    def node_values(self) -> tuple[float, ...] | list[float]:
        """Each tree node's value: `survival`, else the drafted scores."""
        return self.survival or self.tree.scores

    def group_values(self) -> dict[int, float]:
        """{group rows: expected extra tokens next step} for the group sizes this sequence may send."""
        if not self.group_size:
            return {}
        if not self.mask_values:
            return {self.group_size: self.mask_value}
        return {g: v for g, v in enumerate(self.mask_values[: self.group_size], start=1)}


@dataclass
class Choice:
    """What one sequence sends: tree nodes kept, mask-group anchors (ROOT or node indices), rows per group."""

    nodes: list[int]
    anchors: list[int]
    group_size: int = 0


def plan(
    proposals: list[Proposal], cost, max_rows: int, other_rows: int = 0, other_seqs: int = 0,
    group_cost: float = 0.0,
) -> list[Choice]:
    """Maximise (num_sequences + chosen value) / t(rows) over best-first prefixes of the items.

    cost(rows, num_seqs) -> seconds (a LatencyCurve, a LatencySurface, or either plus fixed costs);
    other_rows / other_seqs: the step's sequences that do not speculate (rows, one token each);
    group_cost: seconds a step pays once when it carries any mask group (a gated adapter's deltas).
    """
    num_seqs = len(proposals) + other_seqs

    def curve(rows: int) -> float:
        return cost(rows, num_seqs)

    base = other_rows + sum(p.base_rows for p in proposals)
    nodes, _ = _best_prefix(_node_items(proposals), num_seqs, base, curve, max_rows)
    chosen = [[i for s, i in nodes if s == seq] for seq in range(len(proposals))]
    value = num_seqs + sum(proposals[s].node_values()[i] for s, i in nodes)
    best_rate, groups, size = value / curve(base + len(nodes)), [], 0
    sizes = sorted({g for p in proposals for g in p.group_values()})
    ends = _group_ends(proposals, chosen) if sizes else []
    for g in sizes:  # one group size for the step: the one whose best groups give the best rate (ties: smaller)
        found, rate = _best_prefix(_group_items(proposals, ends, g), value, base + len(nodes), curve, max_rows,
                                   group_cost)
        if found and rate > best_rate:
            best_rate, groups, size = rate, found, g
    return [Choice(chosen[s], sorted(a for q, a in groups if q == s), size) for s in range(len(proposals))]


def _node_items(proposals: list[Proposal]) -> list[tuple[float, int, int, int]]:
    """(value, cost, sequence, node), best first; a node's score never exceeds its parent's, and
    ties go to the shallower node, so every prefix of this order is closed under parents."""
    keyed = sorted((-score, p.tree.depth(i), s, i) for s, p in enumerate(proposals)
                   for i, score in enumerate(p.node_values()))
    return [(-neg, 1, s, i) for neg, _, s, i in keyed]  # ties beyond depth: (sequence, node) order, as listed


def _group_ends(proposals: list[Proposal], chosen: list[list[int]]) -> list[tuple[int, int, float]]:
    """(sequence, anchor, P(anchor is the last accepted node)) for every possible anchor (the root and each
    chosen node) of the sequences that may send a group: its reach less its chosen children's."""
    out = []
    for s, p in enumerate(proposals):
        if not p.group_size:
            continue
        kept, scores = set(chosen[s]), p.node_values()
        for anchor in [ROOT] + chosen[s]:
            reach = 1.0 if anchor == ROOT else scores[anchor]
            onward = sum(scores[c] for c in p.tree.children(anchor) if c in kept)
            out.append((s, anchor, max(0.0, reach - onward)))
    return out


def _group_items(proposals: list[Proposal], ends: list[tuple[int, int, float]],
                 size: int) -> list[tuple[float, int, int, int]]:
    """(value, cost, sequence, anchor) of groups of `size` rows: P(anchor is the last accepted node) * the
    mask value of such a group (`_group_ends`), best per row first (sequences that may not send `size` rows
    have none)."""
    values = [p.group_values().get(size) for p in proposals]
    items = [(end * values[s], size, s, anchor) for s, anchor, end in ends if values[s] is not None]
    return sorted(items, key=lambda it: -it[0] / it[1])


def _best_prefix(items, value: float, rows: int, curve, max_rows: int,
                 fixed: float = 0.0) -> tuple[list[tuple[int, int]], float]:
    """The (sequence, index) pairs of the best prefix of `items` by (value / t(rows)), and that rate; a
    non-empty prefix also pays `fixed` seconds."""
    best_k, best = 0, value / curve(rows)
    for k, (v, cost, _, _) in enumerate(items, start=1):
        value, rows = value + v, rows + cost
        if rows > max_rows:
            break
        rate = value / (curve(rows) + fixed)
        if rate > best:
            best_k, best = k, rate
    return [(s, i) for _, _, s, i in items[:best_k]], best


class RobustRatio:
    """A cost correction learnt from noisy steps: the weighted median of `seconds / weight` over the last
    `window` observations, clamped to [lo, hi].

    On a shared CPU a step is sometimes stalled by another process; a running mean lets one such step
    (a residual of milliseconds over a probed cost of a fraction of one) drag the factor to its clamp,
    where it prices every row out. A weighted median moves by at most one observation's weight share,
    and observations with little probed cost (one extra row) weigh little.
    """

    def __init__(self, initial: float, lo: float, hi: float, window: int = 32) -> None:
        self.value, self.lo, self.hi, self.window = initial, lo, hi, window
        self._seen: list[tuple[float, float]] = []  # (ratio, weight), oldest first

    def observe(self, seconds: float, weight: float) -> float:
        """Add one step's `seconds` against its probed `weight` (> 0); the updated value."""
        if weight <= 0:
            return self.value
        self._seen.append((seconds / weight, weight))
        del self._seen[: -self.window]
        self.value = min(self.hi, max(self.lo, _weighted_median(self._seen)))
        return self.value


def _weighted_median(pairs: list[tuple[float, float]]) -> float:
    """The value at half the total weight of (value, weight) pairs."""
    ordered = sorted(pairs)
    half, running = sum(w for _, w in ordered) / 2, 0.0
    for value, weight in ordered:
        running += weight
        if running >= half:
            return value
    return ordered[-1][0]


class RealisedShare:
    """What share of a predicted amount is realised: sum(realised) / sum(predicted) over the last `window`
    observations plus a prior of `prior` predicted units realised in full, clamped to [0, hi].

    A ratio of sums, not a median: realised amounts are small integers, mostly 0 where a prediction is
    rarely met, and it is their total against the predicted total that prices what is sent."""

    def __init__(self, prior: float = 2.0, hi: float = 1.5, window: int = 64) -> None:
        self.prior, self.hi, self.window = prior, hi, window
        self._seen: list[tuple[float, float]] = []  # (realised, predicted), oldest first
        self.value = 1.0

    def observe(self, realised: float, predicted: float) -> float:
        """Add one observation (`predicted` > 0, else ignored); the updated value."""
        if predicted <= 0:
            return self.value
        self._seen.append((realised, predicted))
        del self._seen[: -self.window]
        got = sum(r for r, _ in self._seen) + self.prior
        self.value = min(self.hi, got / (sum(p for _, p in self._seen) + self.prior))
        return self.value
