"""The SPACE step layout: which rows a sequence feeds, what each sees, where each sits.

A sequence feeds a *chain* of real tokens (its uncached tokens, then its `n`
candidates) followed by mask *groups*. The chain is causal among itself and sees
no mask. A group anchored at chain index `a` holds `g` masks that see chain[0..a]
and the earlier masks of their own group, at positions just after chain[a].
Prefill is the same shape: the chain is the prompt, one group after its last token.
Every row's position is its number of visible keys minus one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SeqPlan:
    """One sequence's rows in a step."""

    chain: list[int]  # uncached tokens then candidates; KV of all of them is written
    num_candidates: int  # n: the last n chain tokens are candidates to verify
    anchors: list[int]  # candidate counts a (0..n) after which a mask group is attached
    group_size: int  # g: masks per group (the next step's candidate count)
    num_cached: int  # tokens already in the KV cache

    @property
    def num_rows(self) -> int:
        """Chain rows plus mask rows."""
        return len(self.chain) + len(self.anchors) * self.group_size

    @property
    def first_verify_row(self) -> int:
        """Chain row whose logits predict the first candidate (the last uncached token)."""
        return len(self.chain) - self.num_candidates - 1

    def group_rows(self, j: int) -> range:
        """Rows of the j-th group (anchored at `anchors[j]`)."""
        start = len(self.chain) + j * self.group_size
        return range(start, start + self.group_size)


def seq_layout(plan: SeqPlan, mask_token_id: int) -> tuple[list[int], list[int], torch.Tensor]:
    """(input ids [R], positions [R], visibility [R, R] bool) for one sequence."""
    chain_len, g, t = len(plan.chain), plan.group_size, plan.num_cached
    ids = list(plan.chain) + [mask_token_id] * (len(plan.anchors) * g)
    positions = list(range(t, t + chain_len))
    vis = torch.zeros(plan.num_rows, plan.num_rows, dtype=torch.bool)
    vis[:chain_len, :chain_len] = torch.ones(chain_len, chain_len, dtype=torch.bool).tril()
    own = torch.ones(g, g, dtype=torch.bool).tril()
    for j, a in enumerate(plan.anchors):
        anchor = plan.first_verify_row + a  # chain index of the token the group follows
        rows = plan.group_rows(j)
        vis[rows.start : rows.stop, : anchor + 1] = True
        vis[rows.start : rows.stop, rows.start : rows.stop] = own
        positions.extend(range(t + anchor + 1, t + anchor + 1 + g))
    return ids, positions, vis


@dataclass
class StepLayout:
    """The flat ragged batch of a step and where to find each sequence's logits."""

    input_ids: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    visibility: list[torch.Tensor]  # B x [n_i, n_i]
    cu_seqlens: list[int]  # [B + 1]
    logit_rows: torch.Tensor  # [L] flat rows whose logits are computed
    logit_offsets: list[int]  # [B + 1] each sequence's slice of logit_rows


def build_layout(plans: list[SeqPlan], mask_token_id: int) -> StepLayout:
    """Concatenate every sequence's rows; select verify rows and mask rows for logits."""
    ids: list[int] = []
    positions: list[int] = []
    visibility: list[torch.Tensor] = []
    cu, logit_rows, logit_offsets = [0], [], [0]
    for plan in plans:
        seq_ids, seq_pos, vis = seq_layout(plan, mask_token_id)
        base = cu[-1]
        verify = range(plan.first_verify_row, len(plan.chain))  # n + 1 rows
        logit_rows.extend(base + r for r in verify)
        logit_rows.extend(range(base + len(plan.chain), base + plan.num_rows))
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
    )


def split_logits(plan: SeqPlan, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A sequence's logits [n + 1 + G*g, V] -> (verify rows [n + 1, V], groups [G, g, V])."""
    n1 = plan.num_candidates + 1
    groups = logits[n1:].view(len(plan.anchors), plan.group_size, logits.shape[-1])
    return logits[:n1], groups
