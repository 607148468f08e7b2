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

from array import array
from collections import defaultdict, deque

import numpy as np
import torch

from tgi_space.tree import ROOT, DraftTree

NUM_BUCKETS = 5
MAX_DEPTH = 16


class SurvivalCalibration:
    """P(verification reaches a sent node | its drafted survival score), per score bucket: counts with a prior
    at the bucket's middle, made non-decreasing in the score.

    A node's drafted score is the product of its path's calibrated edges. Each edge is nearly calibrated
    (per drafter, depth and confidence), but small excesses compound along a path, and the planner sends
    the nodes whose estimates came out highest: measured at batch 1 on HumanEval prompts
    (benchmarks/survival_trace.py), sent nodes scored 0.1-0.3 were reached 0.08 of the time, and datastore
    nodes 8 or more deep, scored 0.18, 0.03 of the time, so the planner valued rows above what they gave. This second stage learns what
    sent nodes of a given score really give; with SpacePolicy.survival_calibration the planner values them
    at that. Non-decreasing, so a child (score at most its parent's) is never valued above its parent.
    """

    def __init__(self, buckets: int = 20, prior_weight: float = 8.0) -> None:
        self.buckets, self.prior_weight = buckets, prior_weight
        self.hits = [0.0] * buckets
        self.trials = [0.0] * buckets
        self._curve: list[float] | None = None

    def _bucket(self, score: float) -> int:
        return min(self.buckets - 1, max(0, int(score * self.buckets)))

    def add(self, score: float, reached: bool) -> None:
        """One sent node: its drafted score, and whether verification reached it."""
        b = self._bucket(score)
        self.trials[b] += 1
        self.hits[b] += float(reached)
        self._curve = None

    def curve(self) -> list[float]:
        """Per bucket, the estimated reach (hits + prior x middle) / (trials + prior), made non-decreasing by
        pooling adjacent buckets that are out of order (isotonic regression, weighted by trials + prior)."""
        if self._curve is None:
            blocks: list[list[float]] = []  # [weight, weighted sum, buckets]
            for b in range(self.buckets):
                weight = self.trials[b] + self.prior_weight
                blocks.append([weight, self.hits[b] + self.prior_weight * (b + 0.5) / self.buckets, 1])
                while len(blocks) > 1 and blocks[-2][1] / blocks[-2][0] > blocks[-1][1] / blocks[-1][0]:
                    w, total, n = blocks.pop()
                    blocks[-1][0] += w
                    blocks[-1][1] += total
                    blocks[-1][2] += n
            self._curve = [total / w for w, total, n in blocks for _ in range(int(n))]
        return self._curve

    def value(self, score: float) -> float:
        """What the planner values a node of this drafted score at."""
        return self.curve()[self._bucket(score)]

    def table(self) -> list[dict]:
        """The calibration as rows (score bucket, trials, reached, value), for /info."""
        curve = self.curve()
        return [{"score_from": b / self.buckets, "trials": int(self.trials[b]),
                 "reached": self.hits[b] / self.trials[b] if self.trials[b] else None, "value": curve[b]}
                for b in range(self.buckets)]


class Calibration:
    """P(node accepted | parent reached), per (drafter, depth, confidence bucket): counts with a prior."""

    def __init__(self, prior_weight: float = 4.0) -> None:
        self.prior_weight = prior_weight
        self.hits: dict[tuple[str, int, int], float] = defaultdict(float)
        self.trials: dict[tuple[str, int, int], float] = defaultdict(float)
        # Per (drafter, depth): how often a reached node with children from the drafter at that depth had one
        # of them accepted (the chance its drafts extend the accepted path one more token).
        self.extend_hits: dict[tuple[str, int], float] = defaultdict(float)
        self.extend_trials: dict[tuple[str, int], float] = defaultdict(float)

    @staticmethod
    def key(source: str, depth: int, confidence: float) -> tuple[str, int, int]:
        return source, min(depth, MAX_DEPTH), min(NUM_BUCKETS - 1, int(confidence * NUM_BUCKETS))

    def estimate(self, source: str, depth: int, confidence: float) -> float:
        """Calibrated acceptance probability of one edge; the drafter's confidence is the prior."""
        k = self.key(source, depth, confidence)
        return (self.hits[k] + self.prior_weight * confidence) / (self.trials[k] + self.prior_weight)

    def estimates(self, source: str, depths: list[int], confidences: list[float]) -> list[float]:
        """`estimate` of many edges of one drafter at once (the same numbers, one call)."""
        hits, trials, w = self.hits, self.trials, self.prior_weight
        out = []
        for depth, c in zip(depths, confidences):
            k = (source, depth if depth < MAX_DEPTH else MAX_DEPTH, min(NUM_BUCKETS - 1, int(c * NUM_BUCKETS)))
            out.append((hits.get(k, 0.0) + w * c) / (trials.get(k, 0.0) + w))
        return out

    def extension(self, source: str, depth: int, prior: float) -> float:
        """P(a reached node's children from `source`, at `depth`, include the accepted one), with `prior`."""
        k = (source, min(depth, MAX_DEPTH))
        return (self.extend_hits[k] + self.prior_weight * prior) / (self.extend_trials[k] + self.prior_weight)

    def observe(self, tree: DraftTree, reached: set[int], accepted: set[int]) -> None:
        """Count every node whose parent verification reached: a trial, and a hit if accepted (and per
        reached parent and drafter, whether one of its children from that drafter was accepted)."""
        extended: dict[tuple[int, str], bool] = {}
        for i in range(len(tree)):
            parent = tree.parents[i]
            if parent in reached:
                source, hit = tree.sources[i], i in accepted
                k = self.key(source, tree.depth(i), tree.confidences[i])
                self.trials[k] += 1
                self.hits[k] += float(hit)
                extended[parent, source] = extended.get((parent, source), False) or hit
        for (parent, source), hit in extended.items():
            k = (source, min(tree.depth(parent) + 1, MAX_DEPTH))
            self.extend_trials[k] += 1
            self.extend_hits[k] += float(hit)

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


_HASH_MASK = (1 << 64) - 1  # n-gram keys: a polynomial hash modulo 2**64 (numpy's uint64 arithmetic)
_HASH_BASE = 1_000_003
BULK_EXTEND = 32  # appending at least this many tokens at once (a prompt) is done with numpy
SEPARATOR = 1 << 62  # ends each output in a SharedSuffixCache: no token id, so no n-gram across it matches
SUFFIX_MATCHES = 8  # suffix drafts: continuations of this many most recent occurrences at most


class SuffixIndex:
    """A growing token list that finds earlier occurrences of its own suffix in O(max_n + matches).

    For every n in 1..max_n and every position i, `_prev[n - 1][i]` is the previous position where the
    n-gram ending at i also ended (-1: none), found through a dict from the n-gram's hash to its last end.
    The longest repeated suffix is then the largest n with `_prev[n - 1][last] >= 0`, and its earlier
    occurrences, most recent first, a walk along `_prev`. Each found occurrence is compared token by token,
    so a hash collision can only hide an occurrence, never invent one. Appending costs max_n dict updates
    per token (a prompt: a few numpy passes); memory is a few ints per token and per distinct n-gram.
    """

    def __init__(self, max_n: int) -> None:
        self.max_n = max_n
        self.tokens: list[int] = []
        self._last: list[dict[int, int]] = [{} for _ in range(max_n)]  # per n: n-gram hash -> last end position
        self._prev: list[array] = [array("q") for _ in range(max_n)]  # per n: previous end of the same n-gram
        self._powers = [pow(_HASH_BASE, n, 1 << 64) for n in range(max_n)]

    def extend(self, tokens: list[int]) -> None:
        """Append the new tokens (call with everything after the part already held)."""
        if len(tokens) >= BULK_EXTEND:
            self._extend_bulk(tokens)
            return
        toks, last, prev, powers = self.tokens, self._last, self._prev, self._powers
        for token in tokens:
            toks.append(token)
            i = len(toks) - 1
            h = 0
            for k in range(self.max_n):  # the (k + 1)-gram toks[i - k : i + 1], hashed from its end backwards
                if k > i:
                    prev[k].append(-1)
                    continue
                h = (h + (toks[i - k] + 1) * powers[k]) & _HASH_MASK
                seen = last[k]
                prev[k].append(seen.get(h, -1))
                seen[h] = i

    def _extend_bulk(self, tokens: list[int]) -> None:
        """`extend` with numpy: the same hashes and links."""
        start = len(self.tokens)
        self.tokens.extend(tokens)
        first = min(start, self.max_n - 1)  # the window holds the max_n - 1 tokens before the new ones
        window = np.asarray(self.tokens[start - first :], dtype=np.uint64) + np.uint64(1)
        h = window.copy()  # the 1-grams (powers[0] == 1)
        positions = np.arange(start, len(self.tokens), dtype=np.int64)
        for k in range(self.max_n):  # the (k + 1)-grams
            if k:
                h[k:] += window[:-k] * np.uint64(self._powers[k])  # wraps modulo 2**64, like the loop
            links = _link_new(h[first:], positions, positions - k >= 0, self._last[k])
            self._prev[k].extend(links.tolist())

    def continuations(self, min_n: int, max_depth: int, max_matches: int) -> tuple[int, list[list[int]]]:
        """(match length, the tokens that followed the most recent earlier occurrences of the longest suffix,
        oldest first)."""
        toks = self.tokens
        last = len(toks) - 1
        for n in range(min(self.max_n, last), max(min_n, 1) - 1, -1):
            conts = self._walk(toks[last - n + 1 :], self._prev[n - 1][last], max_depth, max_matches)
            if conts:
                return n, conts[::-1]
        return 0, []

    def lookup(self, query: list[int], min_n: int, max_depth: int, max_matches: int) -> tuple[int, list[list[int]]]:
        """`continuations` of another token list's longest suffix found in this index (a continuation stops
        before a SEPARATOR; an occurrence with nothing after it does not count)."""
        hashes, h = [], 0
        for k in range(min(self.max_n, len(query))):  # the hashes of query's last 1, 2, ... tokens
            h = (h + (query[-1 - k] + 1) * self._powers[k]) & _HASH_MASK
            hashes.append(h)
        for n in range(len(hashes), max(min_n, 1) - 1, -1):
            conts = self._walk(query[-n:], self._last[n - 1].get(hashes[n - 1], -1), max_depth, max_matches)
            if conts:
                return n, conts[::-1]
        return 0, []

    def _walk(self, suffix: list[int], at: int, max_depth: int, max_matches: int) -> list[list[int]]:
        """What followed `suffix`'s occurrences from position `at` back along the links, most recent first: up
        to `max_depth` tokens each, cut before a SEPARATOR, occurrences with nothing after them skipped. The
        walk stops at the first occurrence that is not really `suffix` (a hash collision)."""
        n, toks, prev, conts = len(suffix), self.tokens, self._prev[len(suffix) - 1], []
        while at >= 0 and len(conts) < max_matches and toks[at - n + 1 : at + 1] == suffix:
            cont = toks[at + 1 : at + 1 + max_depth]
            if SEPARATOR in cont:
                cont = cont[: cont.index(SEPARATOR)]
            if cont:
                conts.append(cont)
            at = prev[at]
        return conts


class SharedSuffixCache:
    """The outputs of recently finished requests, where suffix drafts of any request are also looked up
    (SpacePolicy.suffix_shared_tokens; off by default: it makes one request's speed, never its output,
    depend on the text of others). At most `max_tokens` tokens are held: past that the oldest outputs are
    dropped down to half of it and the index is rebuilt (with numpy), so holding costs O(1) per token."""

    def __init__(self, max_n: int, max_tokens: int) -> None:
        self.max_n, self.max_tokens = max_n, max_tokens
        self._outputs: deque[list[int]] = deque()
        self._held = 0  # tokens held, separators included
        self.index = SuffixIndex(max_n)

    def add(self, output: list[int]) -> None:
        """Hold one finished request's output (its last max_tokens - 1 tokens)."""
        output = list(output[-(self.max_tokens - 1) :]) if self.max_tokens > 1 else []
        if not output:
            return
        self._outputs.append(output)
        self._held += len(output) + 1
        if self._held <= self.max_tokens:
            self.index.extend(output + [SEPARATOR])
            return
        while self._held > self.max_tokens // 2 and len(self._outputs) > 1:
            self._held -= len(self._outputs.popleft()) + 1
        self.index = SuffixIndex(self.max_n)
        self.index.extend([t for out in self._outputs for t in (*out, SEPARATOR)])

    def clear(self) -> None:
        """Forget every output."""
        self._outputs.clear()
        self._held = 0
        self.index = SuffixIndex(self.max_n)


def _link_new(keys: np.ndarray, positions: np.ndarray, valid: np.ndarray, last: dict[int, int]) -> np.ndarray:
    """The previous end of each new position's n-gram (hash `keys`, -1: none; `valid`: the n-gram fits), from
    the earlier new positions (a stable sort groups equal hashes in order) or else from `last`, which then
    learns the new positions' ends."""
    links = np.full(len(keys), -1, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    change = ordered[1:] != ordered[:-1]
    repeat = np.flatnonzero(~change) + 1  # after an earlier new position with the same hash
    links[order[repeat]] = positions[order[repeat - 1]]
    if last:  # (a prompt: nothing is held before it)
        for j in np.flatnonzero(np.concatenate(([True], change))).tolist():  # each hash's first new position
            links[order[j]] = last.get(int(ordered[j]), -1)
    links[~valid] = -1
    ends = order[np.concatenate((change, [True]))]  # each hash's last new position
    ends = ends[valid[ends]]
    last.update(zip(keys[ends].tolist(), positions[ends].tolist()))
    return links


def suffix_tree(index: SuffixIndex, calibration: Calibration, min_n: int, max_depth: int,
                max_matches: int = SUFFIX_MATCHES, max_nodes: int | None = None) -> DraftTree:
    """A trie of what followed the longest repeated suffix; node confidence = its share of its parent's
    matches. With `max_nodes`, only that many best-scored nodes (a node never outscores its parent, and ties
    go to the shallower node, so the kept nodes form a tree), listed best first, parents before children."""
    _, conts = index.continuations(min_n, max_depth, max_matches)
    return trie_tree(conts, calibration, max_nodes)


def trie_tree(conts: list[list[int]], calibration: Calibration, max_nodes: int | None = None,
              source: str = "suffix") -> DraftTree:
    """`suffix_tree` of continuations found already, its nodes from drafter `source`."""
    if not conts:
        return DraftTree()
    tokens, parents, counts, depths, children = _trie(conts)
    shares = [1.0] + [counts[j] / counts[parents[j]] for j in range(1, len(tokens))]
    edges = calibration.estimates(source, depths, shares)
    scores = [1.0] * len(tokens)
    for j in range(1, len(tokens)):  # parents precede children
        scores[j] = scores[parents[j]] * edges[j]
    order = sorted(range(1, len(tokens)), key=lambda j: (-scores[j], depths[j], j))
    if max_nodes is not None:
        order = order[:max_nodes]
    index_of = {0: ROOT, **{j: i for i, j in enumerate(order)}}
    return DraftTree([tokens[j] for j in order], [index_of[parents[j]] for j in order], [scores[j] for j in order],
                     [source] * len(order), [shares[j] for j in order])


def _trie(conts: list[list[int]]) -> tuple[list[int], list[int], list[int], list[int], list[dict[int, int]]]:
    """The trie of token lists, node 0 the root: (token, parent, how many lists pass through, depth, children)
    per node, parents before children."""
    tokens, parents, counts, depths, children = [-1], [-1], [len(conts)], [0], [{}]
    for cont in conts:
        node = 0
        for token in cont:
            child = children[node].get(token)
            if child is None:
                child = len(tokens)
                children[node][token] = child
                tokens.append(token)
                parents.append(node)
                counts.append(0)
                depths.append(depths[node] + 1)
                children.append({})
            counts[child] += 1
            node = child
    return tokens, parents, counts, depths, children


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
