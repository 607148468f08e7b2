"""SDSAT (SPACE.md section 3): a draft pass, then a verify pass, as ordinary plans of the shared step.

Per sequence the two passes alternate; the phase is the sequence's own state (a pending
draft tree means "verify next"), so SDSAT, SPACE and plain sequences share one forward:

    draft  : uncached tokens [b], no tree, one group of g adaptive tokens anchored after b.
             b's row gives the next token v (exact, greedy or sampled); the group gives per depth
             a distribution for the positions after v, from which the next tree is drafted.
    verify : uncached [v], the drafted tree (greedy: the argmax chain d1..dg, and with the planner
             and the suffix drafter, suffix drafts after v merged in, the nodes worth their rows kept;
             sampling: a tree whose children were drawn i.i.d. from those distributions), no group.
             The walk keeps the accepted path's K/V (scratch slots) and emits a bonus token.

A mask/adaptive token at position p whose real context ends at p - 1 predicts the token at p + 1:
the same meaning SPACE's SAR-SFT trains, so one checkpoint serves both (`check_checkpoint`).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tgi_space.config import TRAINING_METHODS, ModelConfig, SpacePolicy
from tgi_space.drafters import merge
from tgi_space.logit_stats import LogitStats
from tgi_space.sampling import apply_warpers
from tgi_space.sequence import Sequence
from tgi_space.space import SeqPlan
from tgi_space.tree import ROOT, DraftTree, SampledDrafts

SOURCE = "sdsat"  # drafter name of SDSAT's nodes (calibration, /info, metrics)


def check_checkpoint(model_config: ModelConfig, k: int) -> None:
    """Raise ValueError (naming the config.json field) when this checkpoint's tokens cannot drive SDSAT at k."""
    mask = model_config.space_mask_token_id
    if mask is None:
        raise ValueError("speculate='sdsat' needs a checkpoint with a mask/adaptive token "
                         "(config.json space_mask_token_id), e.g. from `tgi-space train --method sdsat`")
    method = model_config.space_method
    if method is not None and method not in TRAINING_METHODS:
        raise ValueError(f"config.json space_method {method!r}: its mask token is not known to predict the token "
                         f"after next; SDSAT decodes checkpoints trained by {', '.join(TRAINING_METHODS)}")
    ids = set(model_config.adaptive_token_ids)
    if ids and ids != {mask}:
        raise ValueError(f"config.json sdsat_adaptive_token_ids {list(model_config.adaptive_token_ids)}: one adaptive "
                         f"token per offset; this engine decodes with one shared id (space_mask_token_id {mask})")
    trained = model_config.space_k
    if k < 1:
        raise ValueError(f"speculate='sdsat' needs k >= 1 adaptive tokens per draft pass, got k_max {k}")
    if trained is not None and k > int(trained):
        raise ValueError(f"k_max {k} exceeds the checkpoint's trained space_k {trained}: adaptive tokens past "
                         f"offset {trained} were never trained (use --space-k-max {trained} or less)")


@dataclass
class SdsatStats:
    """Engine-wide SDSAT figures, for /info."""

    draft_passes: int = 0  # sequence-steps that sent a group (the exact token plus drafts)
    verify_passes: int = 0  # sequence-steps that sent a tree
    rows: int = 0  # query rows those passes sent (uncached tokens included)
    drafted_nodes: int = 0  # tree nodes sent by verify passes
    adaptive_tokens: int = 0  # adaptive tokens sent by draft passes (`Speculator.sdsat_depth` chooses how many)


class Sdsat:
    """Plans each SDSAT sequence's pass and drafts its next tree from the adaptive tokens' logits."""

    def __init__(self, policy: SpacePolicy, k: int, suffix: Callable[[Sequence], DraftTree] | None = None,
                 reach: Callable[[int], list[float]] | None = None) -> None:
        """`suffix`: a sequence's suffix drafts (`Speculator.suffix_drafts`), merged into greedy verify passes;
        None: adaptive tokens only. `reach`: the calibrated chance that verification reaches each depth of an
        adaptive chain of g drafts (`Speculator.sdsat_reach`), the chain's node values; None: 1.0."""
        self.policy = policy
        self.k = k  # adaptive tokens per draft pass at most (the checkpoint's or the policy's k)
        # the longest chain of adaptive tokens a verify pass can accept: within max_tree_depth and scratch
        self.max_depth = min(k, policy.max_tree_depth, policy.max_tree_nodes)
        self.suffix, self.reach = suffix, reach
        # the longest path a verify pass can accept (the router's reserve, Info.speculate): suffix drafts
        # reach as deep as SPACE's trees
        self.max_path = min(policy.max_tree_depth, policy.max_tree_nodes) if suffix else self.max_depth
        self.stats = SdsatStats()

    def plan(self, planned: list[tuple[Sequence, SeqPlan]], active: set[int] | None = None,
             depth: int | None = None) -> list[tuple[Sequence, SeqPlan]]:
        """SDSAT sequences get their pass's rows, within what the step's row budget leaves; others unchanged.
        `active`: the indices of the SDSAT sequences that run their pass (the governor's choice,
        `Speculator.sdsat_passes`); the others decode plainly. None: all of them (SDSAT forced).
        `depth`: adaptive tokens per greedy draft pass (`Speculator.sdsat_depth`; None: max_depth). Sampled
        draft passes always send max_depth: their trees' sizes per depth are the policy's."""
        if not any(seq.sdsat for seq, _ in planned):
            return planned
        budget = self.policy.max_step_query_tokens - sum(_base_rows(seq, p) for seq, p in planned)
        out = []
        for i, (seq, base) in enumerate(planned):
            if seq.sdsat:
                uncached = base.chain[: base.num_uncached]
                passes = active is None or i in active
                if not passes:  # decodes plainly, as a plain plan: a tree of no nodes costs Python every step
                    plan = SeqPlan(chain=list(uncached), num_candidates=0, anchors=[], group_size=0,
                                   num_cached=base.num_cached)
                elif seq.draft_tree:
                    plan = self._verify_plan(seq, uncached, base.num_cached, budget)
                else:
                    g = depth if depth is not None and seq.params.is_greedy else self.max_depth
                    plan = self._draft_plan(seq, uncached, base.num_cached, min(budget, g))
                budget -= plan.num_rows - len(uncached)
                self._record(plan)
                base = plan
            out.append((seq, base))
        return out

    def _draft_plan(self, seq: Sequence, uncached: list[int], num_cached: int, budget: int) -> SeqPlan:
        """[b] plus g adaptive tokens after it; no group when no draft could be verified before the end."""
        remaining = seq.params.max_new_tokens - len(seq.output_ids)
        g = max(0, min(self.max_depth, remaining - 2, budget))  # v is emitted, then at most remaining - 2 drafts
        return SeqPlan(chain=list(uncached), num_candidates=0, anchors=[0] if g else [], group_size=g,
                       num_cached=num_cached, parents=(), tree=DraftTree())

    def _verify_plan(self, seq: Sequence, uncached: list[int], num_cached: int, budget: int) -> SeqPlan:
        """[v] plus the drafted tree, cut to what may still be emitted and to the row budget."""
        tree = seq.draft_tree
        cap = seq.params.max_new_tokens - len(seq.output_ids) - 1
        keep = [i for i in range(len(tree)) if tree.depth(i) <= cap][: max(0, budget)]
        if len(keep) < len(tree):  # a cut sampled tree loses its draw lists: verified by draw-then-match
            tree = tree.subtree(keep)
        return SeqPlan(chain=list(uncached) + tree.tokens, num_candidates=len(tree), anchors=[], group_size=0,
                       num_cached=num_cached, parents=tuple(tree.parents), tree=tree)

    def _record(self, plan: SeqPlan) -> None:
        s = self.stats
        s.rows += plan.num_rows
        if plan.anchors:
            s.draft_passes += 1
            s.adaptive_tokens += plan.group_size
        elif plan.num_candidates:
            s.verify_passes += 1
            s.drafted_nodes += plan.num_candidates

    def draft_next(self, seq: Sequence, plan: SeqPlan, groups: torch.Tensor, stats: LogitStats) -> None:
        """After a pass: a draft pass's group [1, g, V] becomes the next tree; after a verify pass, none.
        `stats`: the step's logit statistics from the sequence's first row (the group follows row 0)."""
        seq.draft_tree = None
        if seq.is_finished or not plan.anchors:
            return
        group = groups[0]  # [g, V]
        if seq.params.is_greedy:
            g = plan.group_size
            chain = adaptive_chain([stats.top(r, 1) for r in range(1, 1 + g)], self.reach(g) if self.reach else None)
            seq.draft_tree = merge([chain, self.suffix(seq)]) if self.suffix else chain
        else:
            q = apply_warpers(group.float(), seq.params).softmax(-1)  # [g, V] the request's own warpers
            seq.draft_tree = adaptive_tree(q, self.policy.sdsat_tree_sizes, self.max_depth,
                                           self.policy.max_tree_nodes, seq.generator)

    def info(self) -> dict:
        """Running figures for /info."""
        s = self.stats
        passes = s.draft_passes + s.verify_passes
        return {
            "k": self.k, "max_depth": self.max_depth, "tree_sizes": list(self.policy.sdsat_tree_sizes),
            "draft_passes": s.draft_passes, "verify_passes": s.verify_passes,
            "rows_per_pass": s.rows / max(1, passes),
            "nodes_per_verify_pass": s.drafted_nodes / max(1, s.verify_passes),
            "adaptive_tokens_per_draft_pass": s.adaptive_tokens / max(1, s.draft_passes),
        }


def _base_rows(seq: Sequence, plan: SeqPlan) -> int:
    """Rows a plan sends before SDSAT adds its own: all of them, or an SDSAT sequence's uncached tokens."""
    return plan.num_uncached if seq.sdsat else plan.num_rows


def adaptive_chain(tops: list[tuple[list[int], list[float]]], reach: list[float] | None = None) -> DraftTree:
    """Greedy drafts: the argmax of each adaptive token, as a chain d1..dg; tops: per adaptive token, its
    best token and that token's probability ([id], [p]), from the step's logit statistics; reach: each
    depth's score (the chance verification gets there), else 1.0."""
    tree, parent = DraftTree(), ROOT
    for d, (ids, probs) in enumerate(tops):
        parent = tree.add(ids[0], parent, reach[d] if reach else 1.0, SOURCE, probs[0])
    return tree


def adaptive_tree(q: torch.Tensor, sizes: tuple[int, ...], max_depth: int, max_nodes: int,
                  generator: torch.Generator) -> DraftTree:
    """Sampled drafts: sizes[d] draws at depth d + 1, i.i.d. from q[d] [V], shared out over the depth-d nodes.

    The number of draws a node gets depends only on shallower tokens, and drawing stops (before a
    draw, never after seeing it) once the tree holds max_nodes nodes, so each node's children are
    i.i.d. draws from q given their count: what `verify_tree_rejection` needs to be exact.
    """
    drafts = SampledDrafts(q, {})
    tree = DraftTree(sampled=drafts)
    level, weight = [ROOT], {ROOT: 1.0}
    for d in range(min(len(sizes), q.shape[0], max_depth)):
        counts = share_draws(sizes[d], [weight[u] for u in level])
        tokens = torch.multinomial(q[d], sum(counts), replacement=True, generator=generator).tolist()
        next_level, i = [], 0
        for parent, count in zip(level, counts):
            for token in tokens[i : i + count]:
                if len(tree) >= max_nodes:
                    return tree
                child = _add_draw(tree, drafts, parent, token, weight[parent] * float(q[d, token]))
                if child not in weight:
                    weight[child] = tree.scores[child]
                    next_level.append(child)
            i += count
        level = next_level
    return tree


def _add_draw(tree: DraftTree, drafts: SampledDrafts, parent: int, token: int, path_q: float) -> int:
    """One draw of `token` under `parent`: a new node, or the sibling already holding it (listed again)."""
    child = tree.add(token, parent, path_q, SOURCE, path_q)
    drafts.draws.setdefault(parent, []).append(child)
    return child


def share_draws(n: int, weights: list[float]) -> list[int]:
    """n draws shared out over nodes in proportion to their weights (largest quotient first: D'Hondt)."""
    counts = [0] * len(weights)
    heap = [(-w, i) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    for _ in range(n if weights else 0):
        _, i = heapq.heappop(heap)
        counts[i] += 1
        heapq.heappush(heap, (-weights[i] / (counts[i] + 1), i))
    return counts
