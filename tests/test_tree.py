"""Token trees: layout, exact verification (greedy and sampled, with a negative control), planner, engine."""

from __future__ import annotations

import itertools
from pathlib import Path
import random

import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.stats import chisquare

from tgi_space.config import SpacePolicy
from tgi_space.llm import LLM
from tgi_space.planner import LatencyCurve, Proposal, plan
from tgi_space.sampling import SamplingParams, sample
from tgi_space.sequence import Sequence
from tgi_space.space import SeqPlan, seq_layout
from tgi_space.speculation import Speculator
from tgi_space.tree import ROOT, DraftTree, verify_tree_greedy, verify_tree_sampled

BUNDLED = Path(__file__).resolve().parents[1] / "models" / "tiny-space-py"

MASK = 999


@st.composite
def tree_plans(draw):
    n = draw(st.integers(0, 8))
    parents = tuple(draw(st.integers(-1, j - 1)) for j in range(n))
    uncached = draw(st.integers(1, 4))
    g = draw(st.integers(0, 4))
    anchors = sorted(draw(st.sets(st.integers(0, n), min_size=1))) if g else []
    chain = draw(st.lists(st.integers(0, 500), min_size=uncached + n, max_size=uncached + n))
    return SeqPlan(chain, n, anchors, g, draw(st.integers(0, 40)), parents=parents)


def ancestors(parents: tuple[int, ...], j: int) -> set[int]:
    out = set()
    while j >= 0:
        out.add(j)
        j = parents[j]
    return out


def expected_visible(plan: SeqPlan, row: int) -> set[int]:
    """Independent statement of SPACE.md section 5: uncached tokens, ancestors and self; groups see their anchor's path."""
    u, n = plan.num_uncached, plan.num_candidates
    if row < u:
        return set(range(row + 1))
    if row < u + n:
        return set(range(u)) | {u + a for a in ancestors(plan.parents, row - u)}
    j, m = divmod(row - u - n, plan.group_size)
    anchor = plan.anchors[j]
    path = set(range(u)) if anchor == 0 else set(range(u)) | {u + a for a in ancestors(plan.parents, anchor - 1)}
    start = u + n + j * plan.group_size
    return path | set(range(start, start + m + 1))


@settings(max_examples=300, deadline=None)
@given(tree_plans())
def test_tree_visibility_and_positions(plan):
    ids, positions, vis = seq_layout(plan, MASK)
    for row in range(plan.num_rows):
        seen = set(vis[row].nonzero().flatten().tolist())
        assert seen == expected_visible(plan, row)
        assert positions[row] == plan.num_cached + len(seen) - 1  # visible keys - 1


def random_tree(rng: random.Random, size: int, vocab: int) -> DraftTree:
    tree = DraftTree()
    for _ in range(size):
        parent = rng.randrange(-1, len(tree))
        tree.add(rng.randrange(vocab), parent, 0.5, "test", 0.5)
    return tree


def test_greedy_walk_equals_the_deepest_matching_path():
    rng = random.Random(0)
    for _ in range(500):
        tree = random_tree(rng, rng.randrange(0, 12), 4)
        targets = [rng.randrange(4) for _ in range(len(tree) + 1)]
        path, bonus = verify_tree_greedy(targets, tree)
        # reference: all nodes whose every edge matches the argmax of its parent; the deepest one
        matching = [i for i in range(len(tree))
                    if all(tree.tokens[j] == targets[tree.parents[j] + 1] for j in tree.path(i))]
        deepest = max(matching, key=tree.depth, default=ROOT)
        assert path == tree.path(deepest)
        assert bonus == targets[deepest + 1]


# ---- sampling: a Markov chain over 4 tokens is the "model" ---------------------------------------

P = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]])


def draft_tree(last: int) -> DraftTree:
    """A deterministic tree: the two likeliest next tokens, then the likeliest after the first."""
    tree = DraftTree()
    first, second = P[last].topk(2).indices.tolist()
    a = tree.add(first, ROOT, 0.5, "test", 0.5)
    tree.add(second, ROOT, 0.3, "test", 0.3)
    tree.add(int(P[first].argmax()), a, 0.3, "test", 0.3)
    return tree


def biased_rule(target_logits, tree, generator):
    """The SPACE/SDSAT reference's style: accept a draft with probability p(draft), else resample from p."""
    probs = target_logits.softmax(-1)
    path, node = [], ROOT
    while True:
        kids = tree.children(node)
        if kids and torch.rand(1, generator=generator).item() < probs[node + 1, tree.tokens[kids[0]]].item():
            path.append(kids[0])
            node = kids[0]
            continue
        return path, sample(probs[node + 1], generator)


def generate(rule, length: int, seed: int) -> tuple[int, ...]:
    gen = torch.Generator().manual_seed(seed)
    out = [0]
    while len(out) < length + 1:
        tree = draft_tree(out[-1])
        rows = [out[-1]] + [tree.tokens[i] for i in range(len(tree))]
        logits = P[rows].log()
        path, bonus = rule(logits, tree, gen)
        out += [tree.tokens[i] for i in path] + [bonus]
    return tuple(out[1 : length + 1])


def exact_probability(seq: tuple[int, ...]) -> float:
    p, last = 1.0, 0
    for t in seq:
        p, last = p * P[last, t].item(), t
    return p


@pytest.mark.parametrize("rule, preserved", [(verify_tree_sampled, True), (biased_rule, False)])
def test_tree_sampling_keeps_the_distribution(rule, preserved):
    n, length = 12000, 3
    counts = {s: 0 for s in itertools.product(range(4), repeat=length)}
    for seed in range(n):
        counts[generate(rule, length, seed)] += 1
    observed = list(counts.values())
    probs = [exact_probability(s) for s in counts]
    expected = [n * p / sum(probs) for p in probs]  # renormalised: float32 rounding of P
    p_value = chisquare(observed, expected).pvalue
    if preserved:
        assert p_value > 1e-3
    else:  # negative control: the test does catch a rule that is not distribution-preserving
        assert p_value < 1e-6


# ---- planner --------------------------------------------------------------------------------------

def chain_tree(scores: list[float]) -> DraftTree:
    tree, parent = DraftTree(), ROOT
    for i, s in enumerate(scores):
        parent = tree.add(10 + i, parent, s, "test", s)
    return tree


def test_planner_sends_everything_worth_it_on_a_flat_curve_and_nothing_on_a_steep_one():
    proposals = [Proposal(1, chain_tree([0.9, 0.8, 0.5, 0.01]), 0, 0.0) for _ in range(2)]
    flat = LatencyCurve({1: 1.0, 64: 1.0})
    assert [c.nodes for c in plan(proposals, flat, 512)] == [[0, 1, 2, 3]] * 2
    steep = LatencyCurve({1: 1.0, 2: 2.0, 64: 64.0})  # every row costs as much as a whole step
    assert [c.nodes for c in plan(proposals, steep, 512)] == [[], []]
    knee = LatencyCurve({1: 1.0, 6: 1.0, 7: 1.6, 64: 20.0})  # 2 x (1 + 2) rows fit under the knee
    assert [c.nodes for c in plan(proposals, knee, 512)] == [[0, 1], [0, 1]]


def test_planner_attaches_a_mask_group_where_the_walk_likely_ends():
    proposal = Proposal(1, chain_tree([0.9, 0.1]), 3, 2.0)
    (choice,) = plan([proposal], LatencyCurve({1: 1.0, 64: 1.0}), 512)
    assert choice.nodes == [0, 1]
    assert 0 in choice.anchors  # P(last accepted = node 0) = 0.9 - 0.1: the best anchor


def _group_rate(proposal: Proposal, nodes: list[int], anchors, g: int, curve, group_cost: float) -> float:
    """Expected tokens per second of one chain sequence sending `nodes` and groups of g rows at `anchors`."""
    scores, n = proposal.tree.scores, len(nodes)
    value = 1 + sum(scores[i] for i in nodes) + sum(
        ((1.0 if a == ROOT else scores[a]) - (scores[a + 1] if a + 1 < n else 0.0)) * proposal.group_values()[g]
        for a in anchors)
    return value / (curve(1 + n + g * len(anchors)) + (group_cost if anchors else 0.0))


@pytest.mark.parametrize("points, group_cost, size", [
    ({1: 1.0, 64: 1.0}, 0.5, 4),  # rows free: the largest group
    ({1: 1.0, 4: 1.05, 5: 1.6, 64: 40.0}, 0.0, 1),  # one row to spare under the knee
    ({1: 1.0, 5: 1.05, 6: 1.7, 64: 40.0}, 0.05, 2),
    ({1: 1.0, 6: 1.1, 7: 1.8, 64: 40.0}, 0.05, 3),
    ({1: 1.0, 2: 3.0, 64: 120.0}, 0.0, 0),  # nothing pays
])
def test_planner_picks_the_group_size_that_an_enumeration_of_every_group_plan_finds_best(points, group_cost, size):
    """Small groups are what pays where rows are dear: for the nodes it keeps, the planner's group size is the
    best of every group size x anchor set, and its rate the best one's (close: its anchors are best-first)."""
    from itertools import combinations

    curve = LatencyCurve(points)
    proposal = Proposal(1, chain_tree([0.8, 0.5]), 4, 2.4, mask_values=(0.8, 1.4, 1.9, 2.4))
    (choice,) = plan([proposal], curve, 512, group_cost=group_cost)
    nodes = choice.nodes
    options = [(_group_rate(proposal, nodes, (), 0, curve, group_cost), 0)] + [
        (_group_rate(proposal, nodes, anchors, g, curve, group_cost), g)
        for g in (1, 2, 3, 4) for k in range(1, len(nodes) + 2) for anchors in combinations([ROOT] + nodes, k)
    ]
    best_rate, best_size = max(options)
    assert choice.group_size == best_size == size
    got = _group_rate(proposal, nodes, choice.anchors, choice.group_size, curve, group_cost)
    assert got == pytest.approx(best_rate, rel=0.03)


def test_calibration_counts_whether_a_reached_nodes_drafts_extended_the_path():
    from tgi_space.drafters import Calibration

    tree = DraftTree()
    a = tree.add(5, ROOT, 0.9, "masks", 0.9)
    tree.add(6, ROOT, 0.1, "masks", 0.1)  # a sibling: the root's mask drafts count once
    b = tree.add(7, a, 0.5, "masks", 0.5)
    tree.add(8, b, 0.4, "masks", 0.4)  # below a rejected node: never reached
    calibration = Calibration(prior_weight=0.0)
    calibration.observe(tree, {ROOT, a}, {a})  # a accepted, b rejected
    assert calibration.extend_trials[("masks", 1)] == 1 and calibration.extend_hits[("masks", 1)] == 1
    assert calibration.extend_trials[("masks", 2)] == 1 and calibration.extend_hits[("masks", 2)] == 0
    assert ("masks", 3) not in calibration.extend_trials
    assert calibration.extension("masks", 1, prior=0.3) == 1.0


def test_survival_calibration_learns_how_often_sent_nodes_of_a_score_are_reached():
    from tgi_space.drafters import SurvivalCalibration

    calibration = SurvivalCalibration(buckets=10, prior_weight=4.0)
    assert [calibration.value(s) for s in (0.03, 0.51, 0.99)] == pytest.approx([0.05, 0.55, 0.95])  # the prior: the bucket's middle
    for _ in range(36):  # nodes drafted at 0.2-0.3 reached one time in six; at 0.8-0.9 every time
        for hit in (True, False, False, False, False, False):
            calibration.add(0.25, hit)
        calibration.add(0.85, True)
    low, high, top = (calibration.value(s) for s in (0.21, 0.88, 0.97))
    assert low == pytest.approx((36 + 4 * 0.25) / (216 + 4))
    # 0.8-0.9 (0.985) above the empty 0.9-1.0 bucket's prior (0.95): the two are pooled into one value
    assert high == top == pytest.approx((36 + 4 * 0.85 + 4 * 0.95) / (36 + 4 + 4))
    table = calibration.table()
    assert (table[2]["trials"], table[2]["reached"]) == (216, pytest.approx(1 / 6))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.booleans()), max_size=200), st.lists(st.floats(0, 1), min_size=2))
def test_survival_calibration_never_values_a_child_above_its_parent(observed, scores):
    from tgi_space.drafters import SurvivalCalibration

    calibration = SurvivalCalibration()
    for score, hit in observed:
        calibration.add(score, hit)
    curve = calibration.curve()
    assert all(a <= b for a, b in zip(curve, curve[1:]))
    ordered = sorted(scores, reverse=True)  # a path's scores never grow with depth
    values = [calibration.value(s) for s in ordered]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_planner_values_nodes_at_their_calibrated_survival():
    knee = LatencyCurve({1: 1.0, 3: 1.0, 5: 1.5, 64: 40.0})
    tree = chain_tree([0.95, 0.9, 0.85, 0.8])
    (raw,) = plan([Proposal(1, tree, 0, 0.0)], knee, 512)
    assert raw.nodes == [0, 1, 2, 3]  # (1 + 3.5) / 1.5 beats (1 + 2.7) / 1.25 and (1 + 1.85) / 1.0
    (calibrated,) = plan([Proposal(1, tree, 0, 0.0, survival=(0.9, 0.5, 0.2, 0.1))], knee, 512)
    assert calibrated.nodes == [0, 1]  # (1 + 1.4) / 1.0 beats (1 + 1.6) / 1.25 and (1 + 1.7) / 1.5


def test_realised_share_is_a_ratio_of_recent_sums_with_a_prior():
    from tgi_space.planner import RealisedShare

    share = RealisedShare(prior=2.0, hi=1.5, window=2)
    assert share.value == 1.0
    assert share.observe(0, 2.0) == pytest.approx((0 + 2) / (2 + 2))
    assert share.observe(3, 1.0) == pytest.approx((0 + 3 + 2) / (2 + 1 + 2))
    assert share.observe(1, 1.0) == pytest.approx((3 + 1 + 2) / (1 + 1 + 2))  # the first fell out of the window
    assert share.observe(5, 0.0) == pytest.approx(1.5)  # nothing predicted: ignored (value as before, clamped)
    assert share.observe(9, 1.0) == 1.5  # clamped


def test_mask_drafts_are_worth_only_the_accepted_tokens_the_suffix_drafts_missed():
    """Next to a suffix match, a mask group is worth the accepted tokens past the deepest node the suffix
    tree covered; without a match the masks' own calibration prices it, unscaled."""
    spec = Speculator(SpacePolicy(), 4, lambda *a: 1e-3, max_batch=1, max_probe_rows=64)
    suffix = chain_tree([0.9, 0.8, 0.7])  # tokens 10, 11, 12
    nodes = {(suffix.parents[i], suffix.tokens[i]): i for i in range(len(suffix))}
    spec._learn_mask_worth(("greedy", 2.0, nodes), [10, 11, 12])  # all covered: the masks added nothing
    assert spec.mask_worth["greedy"].value == pytest.approx(2 / 4)
    spec._learn_mask_worth(("greedy", 2.0, nodes), [10, 7, 8, 9])  # past depth 1 only the masks had it: 3
    assert spec.mask_worth["greedy"].value == pytest.approx((0 + 3 + 2) / (2 + 2 + 2))
    seq = Sequence(0, [3, 4, 5, 3, 4], SamplingParams(max_new_tokens=8), True, None)
    seq.draft_tree, seq.suffix_matched = chain_tree([0.9]), True
    spec._step_mask_values = {"greedy": (0.8, 1.4, 1.9, 2.4)}
    base = SeqPlan(chain=[5], num_candidates=0, anchors=[], group_size=0, num_cached=4)
    proposal = spec._proposal(seq, base)
    assert proposal.mask_values == pytest.approx(tuple(v * 5 / 6 for v in (0.8, 1.4, 1.9, 2.4)))
    assert proposal.mask_value == pytest.approx(2.4 * 5 / 6)
    seq.suffix_matched = False  # no suffix match: nothing to overlap with
    assert spec._proposal(seq, base).mask_values == pytest.approx((0.8, 1.4, 1.9, 2.4))


def test_sampled_requests_do_not_change_what_greedy_drafts_are_priced_at():
    """Drafts are accepted far less often when sampling hot: their counts go to a calibration of their own,
    so a server mixing both does not price greedy drafts at sampled odds (nor sampled at greedy odds)."""
    llm = LLM(str(BUNDLED), space=SpacePolicy(drafters=("suffix",), latency_curve={1: 1.0, 512: 1.0}))
    prompt = llm.tokenizer.encode("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n")
    spec = llm.engine.speculator
    trials = lambda regime: sum(spec.calibrations[regime].trials.values()) if regime in spec.calibrations else 0
    llm.generate([prompt], SamplingParams(max_new_tokens=48, do_sample=True, temperature=1.0, seed=3))
    assert trials("hot") > 0 and trials("greedy") == 0 and trials("sampled") == 0
    hot = dict(spec.calibrations["hot"].trials)
    llm.generate([prompt], SamplingParams(max_new_tokens=48))
    assert trials("greedy") > 0 and trials("sampled") == 0 and spec.calibrations["hot"].trials == hot
    assert spec.info()["calibration"].keys() == {"hot", "greedy"}


@pytest.mark.parametrize("on", [False, True])
def test_verification_feeds_the_survival_calibration_only_while_it_is_on(on):
    policy = SpacePolicy(drafters=("suffix",), latency_curve={1: 1.0, 512: 1.0}, survival_calibration=on)
    llm = LLM(str(BUNDLED), space=policy)
    prompt = llm.tokenizer.encode("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n")
    llm.generate([prompt], SamplingParams(max_new_tokens=32))
    trials = sum(sum(c.trials) for c in llm.engine.speculator.survival.values())
    assert (trials > 0) is on


@pytest.mark.parametrize("policy, calibrated", [
    (SpacePolicy(survival_calibration=True), True),
    (SpacePolicy(), False),  # off by default
    (SpacePolicy(survival_calibration=True, latency_curve={1: 1e-3, 64: 1e-3}), False),  # pinned: drafted scores
])
def test_proposals_value_nodes_at_their_calibrated_survival_unless_off_or_pinned(policy, calibrated):
    spec = Speculator(policy, 4, lambda *a: 1e-3, max_batch=1, max_probe_rows=64)
    for _ in range(40):
        spec.survival["greedy", "test"].add(0.85, False)  # nodes of score 0.85 that were never reached
    seq = Sequence(0, [3, 4, 5, 3, 4], SamplingParams(max_new_tokens=8), True, None)
    seq.draft_tree = chain_tree([0.85, 0.5])
    values = spec._proposal(seq, SeqPlan(chain=[5], num_candidates=0, anchors=[], group_size=0, num_cached=4)).node_values()
    if calibrated:
        first = spec.survival["greedy", "test"].value(0.85)
        assert first < 0.6 and tuple(values) == (first, min(first, spec.survival["greedy", "test"].value(0.5)))
    else:
        assert tuple(values) == (0.85, 0.5)


@pytest.mark.parametrize("bad", [dict(drafters=("masks", "ngram")), dict(max_tree_nodes=0), dict(max_tree_depth=-1),
                                 dict(max_tree_depth=33),
                                 dict(suffix_min_match=5, suffix_max_match=3), dict(latency_curve={1: -1.0})])
def test_bad_settings_fail_at_start_naming_the_setting(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name.split("_match")[0] if "match" in name else name):
        SpacePolicy(**bad)


# ---- engine: greedy equality with oracle trees corrupted at random --------------------------------

def oracle_trees(monkeypatch, truth: dict[tuple[int, ...], list[int]], error_rate: float, seed: int) -> None:
    """Next trees = the true continuation as a chain, corrupted at random, plus random wrong branches."""
    rng = random.Random(seed)

    def draft_next(self, seq, plan, groups, path, stats):
        ref = truth[tuple(seq.tokens[: seq.num_prompt])]
        start = len(seq.output_ids)
        tree, parent = DraftTree(), ROOT
        for token in ref[start : start + rng.randrange(1, 7)]:
            token = token if rng.random() > error_rate else (token + 1) % 90 + 4
            rng.random() < 0.5 and tree.add(rng.randrange(4, 94), parent, 0.4, "test", 0.4)
            parent = tree.add(token, parent, 0.9, "test", 0.9)
        seq.draft_tree = tree

    monkeypatch.setattr(Speculator, "draft_next", draft_next)


@pytest.mark.parametrize("batch", [1, 4, 8])
@pytest.mark.parametrize("error_rate", [0.0, 0.3, 1.0])
def test_tree_steps_equal_plain_decoding(llama_dir, monkeypatch, batch, error_rate):
    flat = {1: 0.01, 512: 0.01}  # every row free: the planner sends whole trees
    llm = LLM(str(llama_dir), kv_cache_bytes=2**24, block_size=4, space=SpacePolicy(latency_curve=flat))
    gen = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(4, 90, (int(n),), generator=gen).tolist() for n in torch.randint(2, 30, (batch,), generator=gen)]
    params = [SamplingParams(max_new_tokens=10 + 4 * i, stop_token_ids=[7] if i % 3 == 2 else []) for i in range(batch)]
    reference = [o.token_ids for o in llm.generate(prompts, params, speculate="none")]
    oracle_trees(monkeypatch, {tuple(p): r for p, r in zip(prompts, reference)}, error_rate, seed=batch)
    outs = llm.generate(prompts, params, speculate="space")
    assert [o.token_ids for o in outs] == reference
    if error_rate == 0.0:
        assert sum(o.stats.num_steps for o in outs) < sum(len(r) for r in reference)
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks  # blocks come back; scratch slots hold no state


def test_suffix_drafts_serve_a_checkpoint_without_mask_token(tmp_path):
    from tests.checkpoints import save_checkpoint

    save_checkpoint(tmp_path, "llama", seed=2, space=False)
    llm = LLM(str(tmp_path), kv_cache_bytes=2**22, space=SpacePolicy(drafters=("suffix",)))
    prompt = [5, 6, 7, 8, 9] * 6
    params = SamplingParams(max_new_tokens=30)
    plain = llm.generate([prompt], params, speculate="none")[0]
    spec = llm.generate([prompt], params, speculate="space")[0]
    assert spec.token_ids == plain.token_ids


def test_suffix_drafts_capped_keep_the_best_scored_nodes_as_a_tree():
    from tgi_space.drafters import Calibration, SuffixIndex, suffix_tree

    index = SuffixIndex(max_n=8)
    rng = random.Random(3)
    # a repeated motif followed by varied continuations: a bushy trie of what followed "1 2 3"
    tokens = []
    for _ in range(10):
        tokens += [1, 2, 3] + [rng.randrange(4, 9) for _ in range(6)]
    index.extend(tokens + [1, 2, 3])
    full = suffix_tree(index, Calibration(), min_n=1, max_depth=6)
    capped = suffix_tree(index, Calibration(), min_n=1, max_depth=6, max_nodes=7)
    assert len(full) > 7 and len(capped) == 7
    assert all(p == -1 or p < i for i, p in enumerate(capped.parents))  # a tree, parents first
    paths = lambda t: {tuple(t.tokens[j] for j in t.path(i)): t.scores[i] for i in range(len(t))}
    full_paths, capped_paths = paths(full), paths(capped)
    assert all(full_paths[p] == s for p, s in capped_paths.items())  # the same nodes, the same scores
    dropped = [s for p, s in full_paths.items() if p not in capped_paths]
    assert max(dropped) <= min(capped_paths.values())  # the best-scored ones were kept


def test_suffix_trie_counts_what_followed_every_match():
    """Against counting every prefix of the continuations by hand: each node's confidence is its share of
    its parent's matches, its score the product of calibrated edges along its path."""
    from tgi_space.drafters import Calibration, SuffixIndex, suffix_tree

    rng = random.Random(5)
    tokens = []
    for _ in range(8):
        tokens += [7, 8] + [rng.randrange(10, 13) for _ in range(5)]
    index = SuffixIndex(max_n=8)
    index.extend(tokens + [7, 8])
    calibration = Calibration()
    calibration.trials[("suffix", 2, 2)], calibration.hits[("suffix", 2, 2)] = 10.0, 3.0  # not the prior alone
    tree = suffix_tree(index, calibration, min_n=1, max_depth=4)
    _, conts = index.continuations(1, 4, 8)
    counts: dict[tuple[int, ...], int] = {}
    for cont in conts:
        for d in range(1, len(cont) + 1):
            counts[tuple(cont[:d])] = counts.get(tuple(cont[:d]), 0) + 1
    want = {}
    for prefix in sorted(counts, key=len):
        parent = prefix[:-1]
        share = counts[prefix] / (counts[parent] if parent else len(conts))
        score = (want[parent][0] if parent else 1.0) * calibration.estimate("suffix", len(prefix), share)
        want[prefix] = (score, share)
    got = {tuple(tree.tokens[j] for j in tree.path(i)): (tree.scores[i], tree.confidences[i]) for i in range(len(tree))}
    assert got.keys() == want.keys()
    assert all(got[p] == pytest.approx(want[p]) for p in want)


def _continuations_by_hand(tokens: list[int], max_n: int, min_n: int, max_depth: int, max_matches: int):
    """The longest suffix (min_n..max_n tokens) that also ends earlier, and what followed its most recent
    earlier ends (oldest first): by comparing every earlier window."""
    last = len(tokens) - 1
    for n in range(min(max_n, last), max(min_n, 1) - 1, -1):
        suffix = tokens[last - n + 1 :]
        ends = [e for e in range(n - 1, last) if tokens[e - n + 1 : e + 1] == suffix]
        if ends:
            return n, [tokens[e + 1 : e + 1 + max_depth] for e in ends[-max_matches:]]
    return 0, []


@settings(max_examples=150, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 4), min_size=1, max_size=120),
    cuts=st.lists(st.integers(1, 60), max_size=6),
    max_n=st.integers(1, 8),
    min_n=st.integers(1, 3),
)
def test_suffix_index_finds_what_a_scan_of_every_window_finds(tokens, cuts, max_n, min_n):
    """Whatever pieces the tokens arrive in (one at a time, or a prompt's worth through numpy), the index
    finds the same longest repeated suffix and the same recent occurrences as comparing every window."""
    from tgi_space.drafters import SuffixIndex

    index, held = SuffixIndex(max_n=max_n), 0
    for cut in cuts + [len(tokens)]:
        index.extend(tokens[held : held + cut])
        held = min(len(tokens), held + cut)
        got = index.continuations(min_n, max_depth=5, max_matches=3)
        assert got == _continuations_by_hand(tokens[:held], max_n, min_n, 5, 3)


# ---- the shared suffix cache (SpacePolicy.suffix_shared_tokens) -----------------------------------

def _lookup_by_hand(outputs: list[list[int]], query: list[int], max_n: int, min_n: int, max_depth: int,
                    max_matches: int):
    """The longest suffix of `query` (min_n..max_n tokens) found inside one of `outputs`, and what followed
    its most recent occurrences with something after them (oldest first), by comparing every window."""
    for n in range(min(max_n, len(query)), max(min_n, 1) - 1, -1):
        suffix, conts = query[-n:], []
        for out in outputs:
            conts += [out[e + 1 : e + 1 + max_depth] for e in range(n - 1, len(out) - 1) if out[e - n + 1 : e + 1] == suffix]
        if conts:
            return n, conts[-max_matches:]
    return 0, []


@settings(max_examples=150, deadline=None)
@given(
    outputs=st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=50), min_size=1, max_size=5),
    query=st.lists(st.integers(0, 4), min_size=1, max_size=12),
    max_n=st.integers(1, 8),
    min_n=st.integers(1, 3),
)
def test_shared_cache_finds_what_a_scan_of_every_output_finds(outputs, query, max_n, min_n):
    """Another request's suffix looked up in the held outputs: the same match and continuations as comparing
    every window of every output; nothing runs from one output into the next."""
    from tgi_space.drafters import SharedSuffixCache

    cache = SharedSuffixCache(max_n=max_n, max_tokens=10_000)
    for out in outputs:
        cache.add(out)
    got = cache.index.lookup(query, min_n, max_depth=5, max_matches=3)
    assert got == _lookup_by_hand([o for o in outputs if o], query, max_n, min_n, 5, 3)


def test_shared_cache_holds_at_most_its_budget_dropping_the_oldest_outputs():
    from tgi_space.drafters import SEPARATOR, SharedSuffixCache

    cache = SharedSuffixCache(max_n=4, max_tokens=40)
    outputs = [[i] * (3 + i % 5) for i in range(30)]
    for i, out in enumerate(outputs):
        cache.add(out)
        held = cache.index.tokens
        assert len(held) <= 40
        kept = [o for o in outputs[: i + 1]][-held.count(SEPARATOR) :]  # the newest ones, in order
        assert held == [t for o in kept for t in (*o, SEPARATOR)]
    assert cache.index.lookup([29, 29], 1, 4, 8)[0] == 2 and cache.index.lookup([0, 0], 1, 4, 8) == (0, [])
    cache.clear()
    assert cache.index.tokens == [] and cache.index.lookup([29], 1, 4, 8) == (0, [])


def test_shared_cache_drafts_from_other_requests_outputs_and_changes_no_token():
    """A second request for the same prompt finds the first one's output in the shared cache: its drafts
    come from there ("shared") and are accepted, and every token is still plain decoding's."""
    llm = LLM(str(BUNDLED), datastore="none",  # (the model's datastore would draft the first request well too)
              space=SpacePolicy(drafters=("suffix",), suffix_shared_tokens=4096, latency_curve={1: 1.0, 512: 1.0}))
    prompt = llm.tokenizer.encode("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n")
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    plain = llm.generate([prompt], params, speculate="none")[0].token_ids
    first = llm.generate([prompt], params, speculate="space")[0]
    second = llm.generate([prompt], params, speculate="space")[0]
    assert first.token_ids == second.token_ids == plain
    stats = llm.engine.speculator.stats
    assert stats.accepted_by_drafter.get("shared", 0) > 0  # the second request's drafts: the first's output
    assert second.stats.num_steps < first.stats.num_steps
    unshared = LLM(str(BUNDLED), space=SpacePolicy(drafters=("suffix",), latency_curve={1: 1.0, 512: 1.0}))  # datastore on
    for _ in range(2):
        unshared.generate([prompt], params, speculate="space")
    assert "shared" not in unshared.engine.speculator.stats.accepted_by_drafter  # off by default


def test_shared_cache_settings_are_checked_at_start_up():
    with pytest.raises(ValueError, match="suffix_shared_tokens"):
        SpacePolicy(suffix_shared_tokens=-1)
    with pytest.raises(ValueError, match="suffix_shared_tokens needs the suffix drafter"):
        SpacePolicy(drafters=("masks",), suffix_shared_tokens=1024)
