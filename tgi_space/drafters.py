"""Drafters: each proposes a scored candidate tree for a sequence, with no forward pass of its own.

- masks: the mask group anchored at the last accepted token gives, per depth, a
  distribution over the next tokens; its top-1 chain plus the runner-up at depth 1.
- suffix: the longest suffix of the sequence's own tokens (prompt and output) that
  occurred before; the tokens that followed its occurrences, as a trie scored by counts.

A node's survival score is the product, along its path, of calibrated per-edge
acceptance probabilities (`Calibration`), learnt online from what verification
really accepted, per drafter, depth and confidence bucket.
"""

from __future__ import annotations

import heapq
import itertools
from collections import defaultdict

import numpy as np
import torch

from tgi_space.tree import ROOT, DraftTree

NUM_BUCKETS = 5
MAX_DEPTH = 16


class Calibration:
    """P(node accepted | parent reached), per (drafter, depth, confidence bucket): counts with a prior."""

    def __init__(self, prior_weight: float = 4.0) -> None:
        self.prior_weight = prior_weight
        self.hits: dict[tuple[str, int, int], float] = defaultdict(float)
        self.trials: dict[tuple[str, int, int], float] = defaultdict(float)

    @staticmethod
    def key(source: str, depth: int, confidence: float) -> tuple[str, int, int]:
        return source, min(depth, MAX_DEPTH), min(NUM_BUCKETS - 1, int(confidence * NUM_BUCKETS))

    def estimate(self, source: str, depth: int, confidence: float) -> float:
        """Calibrated acceptance probability of one edge; the drafter's confidence is the prior."""
        k = self.key(source, depth, confidence)
        return (self.hits[k] + self.prior_weight * confidence) / (self.trials[k] + self.prior_weight)

    def observe(self, tree: DraftTree, reached: set[int], accepted: set[int]) -> None:
        """Count every node whose parent verification reached: a trial, and a hit if accepted."""
        for i in range(len(tree)):
            if tree.parents[i] in reached:
                k = self.key(tree.sources[i], tree.depth(i), tree.confidences[i])
                self.trials[k] += 1
                self.hits[k] += float(i in accepted)

    def table(self) -> list[dict]:
        """The calibration as rows (drafter, depth, bucket, trials, acceptance), for /info and logs."""
        return [
            {"drafter": k[0], "depth": k[1], "bucket": k[2], "trials": int(self.trials[k]),
             "acceptance": self.hits[k] / self.trials[k]}
            for k in sorted(self.trials) if self.trials[k]
        ]


def mask_tree(group_logits: torch.Tensor, calibration: Calibration, top_m: int) -> DraftTree:
    """From a mask group's logits [g, V]: the top-1 chain, plus the next `top_m - 1` tokens at depth 1."""
    if group_logits.shape[0] == 0:
        return DraftTree()
    top_p, top_ids = group_logits.float().softmax(-1).topk(max(1, top_m), dim=-1)  # [g, m]
    return mask_tree_of(list(zip(top_ids.tolist(), top_p.tolist())), calibration)


def mask_tree_of(tops: list[tuple[list[int], list[float]]], calibration: Calibration) -> DraftTree:
    """The same tree from each group row's best tokens and their probabilities, best first: [(ids, probs)]."""
    tree = DraftTree()
    if not tops:
        return tree
    top_ids, top_p = [ids for ids, _ in tops], [p for _, p in tops]
    parent, score = ROOT, 1.0
    for depth, (p, token) in enumerate(zip(top_p, top_ids), start=1):
        score *= calibration.estimate("masks", depth, p[0])
        parent = tree.add(token[0], parent, score, "masks", p[0])
    for p, token in zip(top_p[0][1:], top_ids[0][1:]):
        tree.add(token, ROOT, calibration.estimate("masks", 1, p), "masks", p)
    return tree


class SuffixIndex:
    """A growing token list, searched for earlier occurrences of its own suffix (numpy, no per-token index)."""

    def __init__(self, max_n: int) -> None:
        self.max_n = max_n
        self.array = np.zeros(0, dtype=np.int64)

    @property
    def tokens(self) -> np.ndarray:
        return self.array

    def extend(self, tokens: list[int]) -> None:
        """Append the new tokens (call with everything after the part already held)."""
        if tokens:
            self.array = np.concatenate((self.array, np.asarray(tokens, dtype=np.int64)))

    def continuations(self, min_n: int, max_depth: int, max_matches: int) -> tuple[int, list[list[int]]]:
        """(match length, the tokens that followed the most recent earlier occurrences of the longest suffix)."""
        a = self.array
        last = len(a) - 1
        if last < 1:
            return 0, []
        ends = np.flatnonzero(a[:last] == a[last])  # earlier positions holding the last token
        length = 1
        while ends.size and length < self.max_n:
            ok = ends >= length
            ok[ok] = a[ends[ok] - length] == a[last - length]
            if not ok.any():
                break
            ends, length = ends[ok], length + 1
        if not ends.size or length < min_n:
            return 0, []
        recent = ends[-max_matches:]
        return length, [a[e + 1 : e + 1 + max_depth].tolist() for e in recent]


def suffix_tree(index: SuffixIndex, calibration: Calibration, min_n: int, max_depth: int,
                max_matches: int = 8, max_nodes: int | None = None) -> DraftTree:
    """A trie of what followed the longest repeated suffix; node confidence = its share of its parent's
    matches. With `max_nodes`, only that many best-scored nodes: the trie is grown best score first (a
    node never outscores its parent, so they form a tree, parents first), and nothing past them is built."""
    tree = DraftTree()
    _, conts = index.continuations(min_n, max_depth, max_matches)
    if not conts:
        return tree
    weights: dict[tuple[int, ...], int] = defaultdict(int)  # repeated text repeats its continuations
    for cont in conts:
        weights[tuple(cont)] += 1
    unique, counts = list(weights), list(weights.values())
    limit = len(conts) * max_depth if max_nodes is None else max_nodes
    frontier: list = []  # (-score, push order, parent node, depth, token, continuations holding it, confidence)
    order = itertools.count()
    _push_children(frontier, order, unique, counts, range(len(unique)), 0, ROOT, 1.0, calibration)
    while frontier and len(tree) < limit:
        neg, _, parent, depth, token, held, confidence = heapq.heappop(frontier)
        node = tree.append(token, parent, -neg, "suffix", confidence)
        _push_children(frontier, order, unique, counts, held, depth, node, -neg, calibration)
    return tree


def _push_children(frontier: list, order, conts: list[tuple[int, ...]], counts: list[int], held, depth: int,
                   node: int, score: float, calibration: Calibration) -> None:
    """Push the children of `node`: the tokens at `depth` of the continuations it holds (`counts` matches
    each), scored by their share of those matches."""
    by_token: dict[int, list[int]] = {}
    total = 0
    for m in held:
        total += counts[m]
        if len(conts[m]) > depth:
            by_token.setdefault(conts[m][depth], []).append(m)
    for token, members in by_token.items():
        confidence = sum(counts[m] for m in members) / total
        child = score * calibration.estimate("suffix", depth + 1, confidence)
        heapq.heappush(frontier, (-child, next(order), node, depth + 1, token, members, confidence))


def merge(trees: list[DraftTree]) -> DraftTree:
    """Union of trees: nodes with the same token path are one node (highest score kept). The largest
    tree is extended in place and returned (drafters hand over fresh trees)."""
    trees = sorted((t for t in trees if len(t)), key=len, reverse=True)
    if not trees:
        return DraftTree()
    out = trees[0]
    for tree in trees[1:]:
        index = {ROOT: ROOT}
        for i in range(len(tree)):
            index[i] = out.add(tree.tokens[i], index[tree.parents[i]], tree.scores[i], tree.sources[i],
                               tree.confidences[i])
    return out  # `add` appends children after their parents: still topological
