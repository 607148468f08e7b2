"""SDSAT's sampled draft trees: exact tree speculative sampling (recursive rejection), with negative controls.

The "model" is a Markov chain over V tokens (P[x] = next-token distribution after x); the
drafts of depth d are drawn i.i.d. from a fixed Q[d] != P, as the adaptive tokens' distributions
are. A generated sequence's distribution must be the chain's own (chi-square against the exact
probabilities); rules that are not distribution-preserving must be caught with p < 1e-6.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.stats import chisquare

from tgi_space.sampling import sample
from tgi_space.sdsat import adaptive_tree, share_draws
from tgi_space.space import SeqPlan, seq_layout
from tgi_space.tree import ROOT, DraftTree, residual, verify_tree_rejection

from tests.test_tree import MASK, expected_visible

V, LENGTH = 4, 3
SIZES = (3, 4, 3)  # draws per depth: several children, repeats, three depths


def chain(seed: int, peaky: float = 2.0):
    """(P [V, V], Q [3, V]): a target chain and per-depth draft distributions, all different."""
    g = torch.Generator().manual_seed(seed)
    P = torch.rand(V, V, generator=g) ** peaky + 0.03
    Q = torch.rand(len(SIZES), V, generator=g) ** peaky + 0.03
    return P / P.sum(-1, keepdim=True), Q / Q.sum(-1, keepdim=True)


def rows_of(tree: DraftTree, last: int) -> list[int]:
    """The token whose next-token distribution each verify row holds: the root's last token, then each node."""
    return [last] + [tree.tokens[i] for i in range(len(tree))]


def generate(rule, P, Q, seed: int, max_nodes: int = 64) -> tuple[int, ...]:
    """LENGTH tokens after token 0, one sampled tree per step (as SDSAT's verify pass)."""
    gen = torch.Generator().manual_seed(seed)
    out = [0]
    while len(out) <= LENGTH:
        tree = adaptive_tree(Q, SIZES, len(SIZES), max_nodes, gen)
        logits = P[rows_of(tree, out[-1])].log()
        path, bonus = rule(logits, tree, gen)
        out += [tree.tokens[i] for i in path] + [bonus]
    return tuple(out[1 : LENGTH + 1])


def exact(P) -> dict[tuple[int, ...], float]:
    probs = {}
    for seq in itertools.product(range(V), repeat=LENGTH):
        p, last = 1.0, 0
        for x in seq:
            p, last = p * float(P[last, x]), x
        probs[seq] = p
    return probs


def pvalue(samples: list[tuple], P) -> float:
    counts, probs = Counter(samples), exact(P)
    keys = sorted(probs)
    total = sum(probs.values())
    return chisquare([counts[k] for k in keys], [len(samples) * probs[k] / total for k in keys]).pvalue


def rejection(logits, tree, gen):
    return verify_tree_rejection(logits, tree, tree.sampled, gen)


def resample_from_p(logits, tree, gen):
    """Negative control: the min(1, p/q) test per draw, but p is never reduced to the residual."""
    probs = logits.softmax(-1)
    path, node = [], ROOT
    while True:
        p, child = probs[node + 1], None
        for c in tree.sampled.draws.get(node, []):
            q = tree.sampled.probs[tree.depth(node)]
            if torch.rand(1, generator=gen).item() * q[tree.tokens[c]] < p[tree.tokens[c]]:
                child = c
                break
        if child is None:
            return path, sample(p, gen)
        path.append(child)
        node = child


def longest_matching_path(logits, tree, gen):
    """Negative control, the reference code's nucleus rule: every root-to-leaf path draws its own token from p
    at each position and is accepted up to its first mismatch; the longest accepted path wins, and the next
    token is drawn from p at its end."""
    probs = logits.softmax(-1)
    leaves = [i for i in range(len(tree)) if not tree.children(i)]
    best: list[int] = []
    for leaf in leaves:
        accepted = []
        for node in tree.path(leaf):
            parent = tree.parents[node]
            if sample(probs[parent + 1], gen) != tree.tokens[node]:
                break
            accepted.append(node)
        if len(accepted) > len(best):
            best = accepted
    end = best[-1] if best else ROOT
    return best, sample(probs[end + 1], gen)


@pytest.mark.parametrize("seed", [0, 1])
def test_recursive_rejection_keeps_the_distribution(seed):
    P, Q = chain(seed)
    samples = [generate(rejection, P, Q, s) for s in range(8000)]
    assert pvalue(samples, P) > 1e-3


def test_recursive_rejection_keeps_the_distribution_when_the_tree_is_capped():
    """Drawing stops at max_nodes (decided before a draw): still exact."""
    P, Q = chain(2)
    samples = [generate(rejection, P, Q, s, max_nodes=4) for s in range(8000)]
    assert pvalue(samples, P) > 1e-3


@pytest.mark.parametrize("rule", [resample_from_p, longest_matching_path], ids=["no-residual", "reference-rule"])
def test_the_test_catches_rules_that_are_not_exact(rule):
    P, Q = chain(0)
    samples = [generate(rule, P, Q, s) for s in range(8000)]
    assert pvalue(samples, P) < 1e-6


def test_trees_really_have_several_children_and_repeated_draws():
    """The statistical tests above exercise what they claim: branching, depth 3, the same token drawn twice."""
    _, Q = chain(0)
    gen = torch.Generator().manual_seed(0)
    trees = [adaptive_tree(Q, SIZES, 3, 64, gen) for _ in range(200)]
    assert all(t.max_depth == 3 for t in trees)
    assert all(len(t.sampled.draws[ROOT]) == SIZES[0] for t in trees)
    assert any(len(set(d)) < len(d) for t in trees for d in t.sampled.draws.values())  # repeats kept as draws
    assert any(len(t.children(ROOT)) > 1 for t in trees)
    for t in trees:  # each depth got exactly its draws
        for depth, n in enumerate(SIZES):
            assert sum(len(d) for node, d in t.sampled.draws.items() if t.depth(node) == depth) == n


def test_equal_distributions_accept_the_first_draw_at_every_depth():
    P, _ = chain(3)
    Q = P[1:2]  # depth-1 drafts drawn from the root's own distribution (the root's last token is 1)
    gen = torch.Generator().manual_seed(0)
    tree = adaptive_tree(Q, (1,), 1, 8, gen)
    logits = P[[1] + tree.tokens].log()
    assert all(rejection(logits, tree, gen)[0] == [0] for _ in range(300))


def test_residual_is_normalised_and_falls_back_to_p():
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.6, 0.2])
    torch.testing.assert_close(residual(p, q), torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(residual(p, p), p)


def test_draws_are_shared_by_weight_and_all_given_out():
    assert share_draws(8, [0.5, 0.3, 0.15, 0.05]) == [5, 2, 1, 0]  # largest quotient: 0.5, 0.3, 0.25, 0.17, 0.15, ...
    assert share_draws(3, [1.0]) == [3]
    assert share_draws(0, [1.0, 1.0]) == [0, 0]
    assert share_draws(5, []) == []


# ---- the two pass layouts: "a group without a tree" and "a chain without a group" ---------------------

@st.composite
def draft_passes(draw):
    u, g = draw(st.integers(1, 6)), draw(st.integers(1, 8))
    chain = draw(st.lists(st.integers(0, 500), min_size=u, max_size=u))
    return SeqPlan(chain, 0, [0], g, draw(st.integers(0, 60)), parents=(), tree=DraftTree())


@st.composite
def verify_passes(draw):
    u, n = draw(st.integers(1, 3)), draw(st.integers(0, 8))
    chain = draw(st.lists(st.integers(0, 500), min_size=u + n, max_size=u + n))
    return SeqPlan(chain, n, [], 0, draw(st.integers(0, 60)), parents=tuple(range(-1, n - 1)))


@settings(max_examples=200, deadline=None)
@given(st.one_of(draft_passes(), verify_passes()))
def test_sdsat_pass_layouts(plan):
    ids, positions, vis = seq_layout(plan, MASK)
    for row in range(plan.num_rows):
        seen = set(vis[row].nonzero().flatten().tolist())
        assert seen == expected_visible(plan, row)
        assert positions[row] == plan.num_cached + len(seen) - 1
    u = plan.num_uncached
    if plan.anchors:  # draft pass: b at t, masks at t+1 .. t+g seeing b, the prefix and earlier masks only
        assert ids[u:] == [MASK] * plan.group_size
        assert positions[u:] == [plan.num_cached + u + j for j in range(plan.group_size)]
    else:  # verify pass: plain causal over [v, d1..dn]
        assert vis.equal(torch.ones(plan.num_rows, plan.num_rows, dtype=torch.bool).tril())
        assert positions == [plan.num_cached + r for r in range(plan.num_rows)]
