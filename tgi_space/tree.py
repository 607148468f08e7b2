"""Candidate token trees: what drafters propose, what the planner trims, what verification walks.

A tree hangs off the sequence's last token (the root, index -1). Node i is a token
with a parent (-1 or an earlier node), a drafter name, and a survival score: the
estimated probability that verification reaches it. A chain is a tree with one
child per node. Verification is a pure function of (tree, target logits, sampling
state), so it is tested without a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tgi_space.sampling import sample

ROOT = -1


@dataclass
class DraftTree:
    """Nodes in topological order (a parent always precedes its children)."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)  # ROOT or an earlier node index
    scores: list[float] = field(default_factory=list)  # survival score of each node, in [0, 1]
    sources: list[str] = field(default_factory=list)  # drafter that proposed each node
    confidences: list[float] = field(default_factory=list)  # the drafter's own confidence, for calibration

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
                index[i] = len(out)
                out.add(self.tokens[i], index[self.parents[i]], self.scores[i], self.sources[i], self.confidences[i])
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
