"""The planned speculative step: drafters propose trees, the planner picks rows, verification walks trees.

Per step, for every speculating sequence: its draft tree (mask and suffix drafts
merged, scored by calibrated survival) and an optional mask group become a
`Proposal`; `planner.plan` chooses what is worth its rows given the measured t(N);
the chosen nodes become the plan's candidate tree (K/V in scratch slots) and the
chosen anchors its mask groups. After the forward, `verify` walks the tree (greedy
or draw-then-match sampling), and `draft_next` builds the next tree.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from tgi_space.config import SpacePolicy
from tgi_space.drafters import Calibration, SuffixIndex, mask_tree, merge, suffix_tree
from tgi_space.planner import LatencyCurve, Proposal, plan
from tgi_space.sampling import process
from tgi_space.sequence import Sequence
from tgi_space.space import SeqPlan
from tgi_space.tree import ROOT, DraftTree, verify_tree_greedy, verify_tree_sampled

CURVE_POINTS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass
class SpeculationStats:
    """Engine-wide figures of the planned step, for metrics and /info."""

    steps: int = 0
    plain_steps: int = 0  # steps where no sequence sent a candidate or a mask (plain-decoding fallback)
    rows: int = 0  # query rows sent, all steps
    predicted_tokens: float = 0.0  # sum over steps of num_sequences + chosen node scores
    realised_tokens: int = 0  # tokens verification emitted (before stop truncation)
    accepted_by_drafter: dict[str, int] = field(default_factory=dict)
    drafted_by_drafter: dict[str, int] = field(default_factory=dict)


class Speculator:
    """Holds the calibration, the latency curve and the mask gain; plans, verifies and drafts."""

    def __init__(
        self, policy: SpacePolicy, mask_group_size: int, measure: Callable[[int], float], max_probe_rows: int
    ) -> None:
        self.policy = policy
        self.max_probe_rows = max_probe_rows  # the measured curve stops here; beyond it is extrapolated
        self.group_size = mask_group_size if "masks" in policy.drafters else 0
        self.measure = measure  # rows -> seconds of one forward (measured once, on first use)
        self.curve: LatencyCurve | None = LatencyCurve(policy.latency_curve) if policy.latency_curve else None
        self.calibration = Calibration()
        self.mask_gain = 1.0  # running mean of tokens the mask drafts got accepted per step
        self.stats = SpeculationStats()

    # ---- planning ------------------------------------------------------------------------

    def latency(self) -> LatencyCurve:
        """The measured t(N), taken on first use (a few forwards per point, medians)."""
        if self.curve is None:
            self.curve = LatencyCurve({n: self.measure(n) for n in CURVE_POINTS if n <= self.max_probe_rows})
        return self.curve

    def plan(self, planned: list[tuple[Sequence, SeqPlan]]) -> list[tuple[Sequence, SeqPlan]]:
        """Give each speculating sequence the tree nodes and mask groups worth their rows."""
        spec = [i for i, (seq, _) in enumerate(planned) if seq.speculate]
        if not spec:
            return planned
        proposals = [self._proposal(*planned[i]) for i in spec]
        choices = plan(proposals, self.latency(), self.policy.max_step_query_tokens)
        out = list(planned)
        for i, proposal, choice in zip(spec, proposals, choices):
            seq, base = planned[i]
            out[i] = (seq, _tree_plan(base, proposal, choice))
        self._record_plan(out, proposals, choices)
        return out

    def _proposal(self, seq: Sequence, base: SeqPlan) -> Proposal:
        remaining = seq.params.max_new_tokens - len(seq.output_ids)
        tree = self._current_tree(seq)
        depth_cap = min(self.policy.max_tree_depth, remaining - 1)
        keep = [i for i in range(len(tree)) if tree.depth(i) <= depth_cap]
        keep = sorted(keep, key=lambda i: -tree.scores[i])[: self.policy.max_tree_nodes]
        group = self.group_size if remaining > 1 else 0
        return Proposal(len(base.chain), tree.subtree(keep), group, self.mask_gain)

    def _current_tree(self, seq: Sequence) -> DraftTree:
        """The drafted tree of the last step, or (first step) suffix drafts from the prompt."""
        if seq.draft_tree is None:
            seq.draft_tree = self._suffix(seq)
        return seq.draft_tree

    def _record_plan(self, out, proposals: list[Proposal], choices) -> None:
        self.stats.steps += 1
        self.stats.rows += sum(p.num_rows for _, p in out)
        self.stats.predicted_tokens += len(out) + sum(
            pr.tree.scores[i] for pr, ch in zip(proposals, choices) for i in ch.nodes
        )
        if all(not p.num_candidates and not p.anchors for _, p in out):
            self.stats.plain_steps += 1

    # ---- verification --------------------------------------------------------------------

    def verify(
        self, seq: Sequence, plan: SeqPlan, logits: torch.Tensor
    ) -> tuple[list[int], int, torch.Tensor]:
        """(accepted node indices, bonus token, processed target rows [len(path) + 1, V] of the emitted tokens)."""
        tree = plan.tree
        paths = [[]] + [[tree.tokens[j] for j in tree.path(i)] for i in range(len(tree))]
        target = _process_rows(logits, seq, paths)  # [n + 1, V]
        if seq.params.is_greedy:
            path, bonus = verify_tree_greedy(target.argmax(-1).tolist(), tree)
        else:
            path, bonus = verify_tree_sampled(target, tree, seq.generator)
        self._observe(tree, path)
        return path, bonus, target[[0] + [i + 1 for i in path]]

    def _observe(self, tree: DraftTree, path: list[int]) -> None:
        self.calibration.observe(tree, {ROOT, *path}, set(path))
        self.stats.realised_tokens += len(path) + 1
        for i in range(len(tree)):
            src = tree.sources[i]
            self.stats.drafted_by_drafter[src] = self.stats.drafted_by_drafter.get(src, 0) + 1
        for i in path:
            src = tree.sources[i]
            self.stats.accepted_by_drafter[src] = self.stats.accepted_by_drafter.get(src, 0) + 1
        if any(s == "masks" for s in tree.sources):
            gained = sum(tree.sources[i] == "masks" for i in path)
            self.mask_gain = 0.9 * self.mask_gain + 0.1 * gained

    # ---- drafting ------------------------------------------------------------------------

    def draft_next(self, seq: Sequence, plan: SeqPlan, groups: torch.Tensor, path: list[int]) -> None:
        """The next step's tree: mask drafts from the group on the accepted path nearest its end, and suffix drafts."""
        trees = [self._suffix(seq)]
        masks = self._mask_rows(seq, plan, groups, path)
        if masks is not None and masks.shape[0]:
            trees.append(mask_tree(masks, self.calibration, self.policy.mask_top_m))
        seq.draft_tree = merge(trees) if not seq.is_finished else DraftTree()

    def _mask_rows(self, seq: Sequence, plan: SeqPlan, groups: torch.Tensor, path: list[int]):
        """Rows [g', V] of the group anchored at the deepest accepted node that has one, from the right offset."""
        anchor_of = {a: j for j, a in enumerate(plan.anchors)}
        chain = [ROOT] + path  # accepted nodes, root first; anchors count candidates: node i -> i + 1
        for depth in range(len(chain) - 1, -1, -1):
            j = anchor_of.get(chain[depth] + 1)
            if j is not None:
                return groups[j, len(chain) - 1 - depth :]
        return None

    def _suffix(self, seq: Sequence) -> DraftTree:
        if "suffix" not in self.policy.drafters:
            return DraftTree()
        if seq.suffix_index is None:
            seq.suffix_index = SuffixIndex(self.policy.suffix_max_match)
        seq.suffix_index.extend(seq.tokens[len(seq.suffix_index.tokens) :])
        return suffix_tree(seq.suffix_index, self.calibration, self.policy.suffix_min_match, self.policy.max_tree_depth)

    def info(self) -> dict:
        """The latency curve, the calibration and the running figures (for /info, logs, benchmarks)."""
        s = self.stats
        return {
            "latency_ms": self.curve.as_dict() if self.curve else None,
            "calibration": self.calibration.table(),
            "mask_gain": self.mask_gain,
            "steps": s.steps, "plain_fallback_rate": s.plain_steps / max(1, s.steps),
            "rows_per_step": s.rows / max(1, s.steps),
            "predicted_tokens_per_step": s.predicted_tokens / max(1, s.steps),
            "accepted_by_drafter": s.accepted_by_drafter, "drafted_by_drafter": s.drafted_by_drafter,
        }


def _tree_plan(base: SeqPlan, proposal: Proposal, choice) -> SeqPlan:
    """The base plan (uncached tokens only) plus the chosen nodes as a candidate tree and the chosen groups."""
    tree = proposal.tree.subtree(choice.nodes)
    index = {old: new for new, old in enumerate(sorted(choice.nodes))}
    anchors = sorted(0 if a == ROOT else index[a] + 1 for a in choice.anchors)
    return SeqPlan(
        chain=list(base.chain) + tree.tokens,
        num_candidates=len(tree),
        anchors=anchors,
        group_size=proposal.group_size if anchors else 0,
        num_cached=base.num_cached,
        parents=tuple(tree.parents),
        tree=tree,
    )


def _process_rows(logits: torch.Tensor, seq: Sequence, paths: list[list[int]]) -> torch.Tensor:
    """Processed logits of the root row and every node row; a row's history ends with its own path."""
    params = seq.params
    if not params.has_penalties and params.watermark is None:
        return process(logits, params, seq.tokens)
    return torch.cat([process(logits[r : r + 1], params, seq.tokens + paths[r]) for r in range(len(paths))])


def measure_forward(run: Callable[[int], None], rows: int, repeats: int = 5) -> float:
    """Median seconds of `run(rows)` after one warm-up call."""
    run(rows)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(rows)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
