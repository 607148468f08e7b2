"""The SPACE step layout: which rows a sequence feeds, what each sees, where each sits.

A sequence feeds a *chain* of real tokens (its uncached tokens, then its `n`
candidates) followed by mask *groups*. The chain is causal among itself and sees
no mask. A group anchored at chain index `a` holds `g` masks that see chain[0..a]
and the earlier masks of their own group, at positions just after chain[a].
Prefill is the same shape: the chain is the prompt, one group after its last token.
Every row's position is its number of visible keys minus one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from tgi_space.tree import DraftTree


@dataclass(frozen=True)
class SeqPlan:
    """One sequence's rows in a step."""

    chain: list[int]  # uncached tokens then candidates
    num_candidates: int  # n: the last n chain tokens are candidates to verify
    anchors: list[int]  # a in 0..n: a mask group follows candidate a - 1 (0: the last uncached token)
    group_size: int  # g: masks per group (the next step's candidate count)
    num_cached: int  # tokens already in the KV cache
    parents: tuple[int, ...] | None = None  # candidate tree: parent of each candidate (-1: the last
    # uncached token); None: the candidates form a chain and their K/V go straight to the sequence's slots
    tree: DraftTree | None = None  # the candidates' drafters and scores, when planned as a tree
    partial: bool = False  # a prefill chunk (TGI's chunk_len): K/V of part of the prompt, no logits, nothing emitted

    @property
    def num_rows(self) -> int:
        """Chain rows plus mask rows."""
        return len(self.chain) + len(self.anchors) * self.group_size

    @property
    def num_uncached(self) -> int:
        """Rows that are not candidates (the tokens whose K/V the sequence keeps for sure)."""
        return len(self.chain) - self.num_candidates

    @property
    def first_verify_row(self) -> int:
        """Chain row whose logits predict the first candidate (the last uncached token)."""
        return self.num_uncached - 1

    @property
    def is_tree(self) -> bool:
        """Candidates carry explicit parents (their K/V goes to scratch slots, the accepted path is moved)."""
        return self.parents is not None

    def candidate_parents(self) -> tuple[int, ...]:
        """Parent of each candidate, -1 for the root; a chain when no tree was given."""
        return self.parents if self.parents is not None else tuple(range(-1, self.num_candidates - 1))

    def group_rows(self, j: int) -> range:
        """Rows of the j-th group (anchored at `anchors[j]`)."""
        start = len(self.chain) + j * self.group_size
        return range(start, start + self.group_size)


def seq_layout(plan: SeqPlan, mask_token_id: int) -> tuple[list[int], list[int], torch.Tensor]:
    """(input ids [R], positions [R], visibility [R, R] bool) for one sequence."""
    key = (plan.num_uncached, plan.candidate_parents(), tuple(plan.anchors), plan.group_size)
    rel_positions, vis = _shape(*key)
    ids = list(plan.chain) + [mask_token_id] * (len(plan.anchors) * plan.group_size)
    return ids, [plan.num_cached + p for p in rel_positions], vis


@functools.lru_cache(maxsize=4096)
def _shape(num_uncached: int, parents: tuple[int, ...], anchors: tuple[int, ...], g: int):
    """Positions relative to the cache length, and the visibility matrix, of one plan shape."""
    u, n = num_uncached, len(parents)
    rows = u + n + len(anchors) * g
    vis = torch.zeros(rows, rows, dtype=torch.bool)
    vis[:u, :u] = torch.ones(u, u, dtype=torch.bool).tril()
    positions = list(range(u))
    depth = []
    for j, parent in enumerate(parents):  # a candidate sees the uncached tokens, its ancestors and itself
        r = u + j
        vis[r, :u] = True
        if parent >= 0:
            vis[r] |= vis[u + parent]
        vis[r, r] = True
        depth.append(1 if parent < 0 else depth[parent] + 1)
        positions.append(u - 1 + depth[-1])
    own = torch.ones(g, g, dtype=torch.bool).tril()
    for j, a in enumerate(anchors):  # a group sees its anchor's row and all that row sees
        anchor_row = u - 1 if a == 0 else u + a - 1
        start = u + n + j * g
        vis[start : start + g] = vis[anchor_row]
        vis[start : start + g, start : start + g] = own
        positions.extend(range(positions[anchor_row] + 1, positions[anchor_row] + 1 + g))
    return positions, vis


@dataclass
class StepLayout:
    """The flat ragged batch of a step and where to find each sequence's logits."""

    input_ids: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    visibility: list[torch.Tensor]  # B x [n_i, n_i]
    cu_seqlens: list[int]  # [B + 1]
    logit_rows: torch.Tensor  # [L] flat rows whose logits are computed
    logit_offsets: list[int]  # [B + 1] each sequence's slice of logit_rows
    mask_rows: torch.Tensor | None = None  # [M] flat rows of mask groups (a gated adapter's gate)


def build_layout(plans: list[SeqPlan], mask_token_id: int) -> StepLayout:
    """Concatenate every sequence's rows; select verify rows and mask rows for logits."""
    ids: list[int] = []
    positions: list[int] = []
    visibility: list[torch.Tensor] = []
    cu, logit_rows, logit_offsets, mask_rows = [0], [], [0], []
    for plan in plans:
        seq_ids, seq_pos, vis = seq_layout(plan, mask_token_id)
        base = cu[-1]
        # n + 1 rows: the root, then each candidate; none for a prefill chunk
        verify = range(0) if plan.partial else range(plan.first_verify_row, len(plan.chain))
        logit_rows.extend(base + r for r in verify)
        logit_rows.extend(range(base + len(plan.chain), base + plan.num_rows))
        mask_rows.extend(range(base + len(plan.chain), base + plan.num_rows))
        ids += seq_ids
        positions += seq_pos
        visibility.append(vis)
        cu.append(base + plan.num_rows)
        logit_offsets.append(len(logit_rows))
    return StepLayout(
        input_ids=torch.tensor(ids, dtype=torch.long),
        positions=torch.tensor(positions, dtype=torch.long),
        visibility=visibility,
        cu_seqlens=cu,
        logit_rows=torch.tensor(logit_rows, dtype=torch.long),
        logit_offsets=logit_offsets,
        mask_rows=torch.tensor(mask_rows, dtype=torch.long),
    )


def split_logits(plan: SeqPlan, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A sequence's logits [n + 1 + G*g, V] -> (verify rows [n + 1, V], groups [G, g, V])."""
    n1 = plan.num_candidates + 1
    groups = logits[n1:].view(len(plan.anchors), plan.group_size, logits.shape[-1])
    return logits[:n1], groups
