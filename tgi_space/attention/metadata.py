"""Per-step attention metadata: built once per forward, read by every layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Where each sequence's new rows sit, what they see, and where their KV goes.

    The forward pass works on a flat ragged batch: the new rows of all sequences
    concatenated. Every new row of sequence i sees the whole cached prefix of i
    (`context_lens[i]` tokens, read through `prefix_slots[i]`) plus the new rows
    of i allowed by `visibility[i]`.
    """

    cu_seqlens_q: list[int]  # [B + 1] row offsets of each sequence in the flat batch
    context_lens: list[int]  # [B] tokens already in the KV cache before this step
    prefix_slots: list[torch.Tensor]  # B x [context_lens[i]] cache slots of the prefix
    visibility: list[torch.Tensor]  # B x [n_i, n_i] bool, row r may attend to new row c
    write_rows: torch.Tensor  # [W] flat rows whose K/V are stored in the cache
    write_slots: torch.Tensor  # [W] cache slot of each stored row
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int32, -1 padded (paged kernels)

    @property
    def num_seqs(self) -> int:
        """Number of sequences in the step."""
        return len(self.context_lens)

    def rows(self, i: int) -> slice:
        """Flat rows of sequence i."""
        return slice(self.cu_seqlens_q[i], self.cu_seqlens_q[i + 1])
