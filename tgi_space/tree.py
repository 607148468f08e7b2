"""Candidate token trees: what drafters propose, what the planner trims, what verification walks.

A tree hangs off the sequence's last token (the root, index -1). Node i is a token
with a parent (-1 or an earlier node), a drafter name, and a survival score: the
estimated probability that verification reaches it. A chain is a tree with one
child per node. Verification is a pure function of (tree, target logits, sampling
state), so it is tested without a model.

Two exact sampling rules: draw-then-match (`verify_tree_sampled`) for any tree built
without the request's random numbers, and multi-draft recursive rejection
(`verify_tree_rejection`) for trees whose children were drawn i.i.d. from a draft
distribution q (SDSAT's sampled tree), which accepts more when q is close to p.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tgi_space.sampling import sample

ROOT = -1


@dataclass
class SampledDrafts:
    """How a tree's children were drawn: i.i.d. (with replacement) from one distribution per depth.

    A child drawn twice is one node listed twice in its parent's draws; the draw order is kept,
    because recursive rejection must try the draws in the order they were made.
    """

    probs: torch.Tensor  # [D, V] float: the children at depth d + 1 were drawn from row d
    draws: dict[int, list[int]] = field(default_factory=dict)  # node (ROOT or index) -> children, one entry per draw


@dataclass
class DraftTree:
    """Nodes in topological order (a parent always precedes its children)."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)  # ROOT or an earlier node index
    scores: list[float] = field(default_factory=list)  # survival score of each node, in [0, 1]
    sources: list[str] = field(default_factory=list)  # drafter that proposed each node
    confidences: list[float] = field(default_factory=list)  # the drafter's own confidence, for calibration
    # Set when the children were sampled from draft distributions (SDSAT); `subtree` and `merge` drop it,
    # and such a tree is verified by draw-then-match, which is exact for any tree.
    sampled: SampledDrafts | None = None

    def __post_init__(self) -> None:
        self._children: dict[int, list[int]] = {}  # node -> its children, kept by `add`
        self._depths: list[int] = []
        for i, parent in enumerate(self.parents):
            self._children.setdefault(parent, []).append(i)
            self._depths.append(1 if parent == ROOT else self._depths[parent] + 1)

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: int, parent: int, score: float, source: str, confidence: float) -> int:
        """Append a node (or return the existing child of `parent` with this token); its index."""
        for i in self._children.get(parent, ()):
            if self.tokens[i] == token:
                if score > self.scores[i]:
                    self.scores[i], self.sources[i], self.confidences[i] = score, source, confidence
                return i
        return self.append(token, parent, score, source, confidence)

    def append(self, token: int, parent: int, score: float, source: str, confidence: float) -> int:
        """Append a new node whose parent has no child with this token (the caller knows); its index."""
        self.tokens.append(token)
        self.parents.append(parent)
        self.scores.append(score)
        self.sources.append(source)
        self.confidences.append(confidence)
        index = len(self.tokens) - 1
        self._children.setdefault(parent, []).append(index)
        self._depths.append(1 if parent == ROOT else self._depths[parent] + 1)
        return index

    def children(self, node: int) -> list[int]:
        """Indices of node's children (node may be ROOT)."""
        return self._children.get(node, [])

    def depth(self, node: int) -> int:
        """1 for a child of the root, 0 for the root."""
        return 0 if node == ROOT else self._depths[node]

    def path(self, node: int) -> list[int]:
        """Node indices from the root's child down to node (empty for ROOT)."""
        out = []
        while node != ROOT:
            out.append(node)
            node = self.parents[node]
        return out[::-1]

    def subtree(self, keep: list[int]) -> "DraftTree":
        """The nodes in `keep` (each with its parent kept too), renumbered in topological order."""
        keep_set = set(keep)
        out, index = DraftTree(), {ROOT: ROOT}
        for i in range(len(self)):
            if i in keep_set and self.parents[i] in index:
                index[i] = out.append(self.tokens[i], index[self.parents[i]], self.scores[i], self.sources[i],
                                      self.confidences[i])
        return out

    @property
    def max_depth(self) -> int:
        """Longest root-to-leaf path (the most tokens one step can accept from it)."""
        return max(self._depths, default=0)


def verify_tree_greedy(targets: list[int], tree: DraftTree) -> tuple[list[int], int]:
    """Follow the argmax child from the root. targets[0] is the root's argmax, targets[i + 1] node i's.

    Returns (accepted node indices root-down, bonus token). Emits exactly what plain greedy emits.
    """
    path, node = [], ROOT
    while True:
        token = targets[node + 1]
        child = next((c for c in tree.children(node) if tree.tokens[c] == token), None)
        if child is None:
            return path, token
        path.append(child)
        node = child


def verify_tree_sampled(
    target_logits: torch.Tensor, tree: DraftTree, generator: torch.Generator
) -> tuple[list[int], int]:
    """Draw-then-match for deterministic drafts: at node u draw y ~ p_u; descend if y is a child, else emit y.

    target_logits [n + 1, V] are processed logits (row 0 the root, row i + 1 node i). Every emitted
    token is a draw from the same distribution plain sampling uses, so the output distribution is
    plain sampling's, whatever the tree.
    """
    probs = target_logits.softmax(-1)
    path, node = [], ROOT
    while True:
        token = sample(probs[node + 1], generator)
        child = next((c for c in tree.children(node) if tree.tokens[c] == token), None)
        if child is None:
            return path, token
        path.append(child)
        node = child


def verify_tree_rejection(
    target_logits: torch.Tensor, tree: DraftTree, drafts: SampledDrafts, generator: torch.Generator
) -> tuple[list[int], int]:
    """Multi-draft recursive rejection (SpecInfer) for children drawn i.i.d. from q: exact for any q.

    At node u with target p: for each draw x of u's children, in draw order, accept with probability
    min(1, p(x) / q(x)) and descend; on rejection p <- normalise(max(0, p - q)) and try the next draw;
    when every draw is rejected (or u has none), emit a draw from the last p. target_logits [n + 1, V]
    are processed logits (row 0 the root, row i + 1 node i); q of u's children is drafts.probs[depth(u)].
    """
    probs = target_logits.float().softmax(-1)
    path, node = [], ROOT
    while True:
        p, child = probs[node + 1], None
        draws = drafts.draws.get(node, [])
        if draws:
            q = drafts.probs[tree.depth(node)].float()
            coins = torch.rand(len(draws), generator=generator).tolist()
            for coin, c in zip(coins, draws):
                x = tree.tokens[c]
                if coin * float(q[x]) < float(p[x]):  # u < p(x) / q(x)
                    child = c
                    break
                p = residual(p, q)
        if child is None:
            return path, sample(p, generator)
        path.append(child)
        node = child


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """normalise(max(0, p - q)): what p still needs after a draw from q was rejected (p itself if p <= q)."""
    rest = (p - q).clamp_min(0)
    total = float(rest.sum())
    return rest / total if total > 0 else p
