"""Per-step attention metadata: built once per forward, read by every layer."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

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
    num_kv_heads: int = 1  # for the per-head key index of the padded layout

    @property
    def num_seqs(self) -> int:
        """Number of sequences in the step."""
        return len(self.context_lens)

    def rows(self, i: int) -> slice:
        """Flat rows of sequence i."""
        return slice(self.cu_seqlens_q[i], self.cu_seqlens_q[i + 1])

    @cached_property
    def padded(self) -> list["PaddedBatch"]:
        """The batch as padded groups for matmul attention; built on first use, shared by all layers.

        Sequences with similar numbers of new rows share a group (`ROW_BUCKETS`); each prefill
        longer than the last bucket gets its own, so padding stays bounded.
        """
        counts = [self.cu_seqlens_q[i + 1] - self.cu_seqlens_q[i] for i in range(self.num_seqs)]
        buckets: dict[int, list[int]] = {}
        for i, n in enumerate(counts):
            bucket = next((b for b, limit in enumerate(ROW_BUCKETS) if n <= limit), len(ROW_BUCKETS) + i)
            buckets.setdefault(bucket, []).append(i)
        groups = list(buckets.values())
        if len(groups) == 1:
            return [PaddedBatch.build(self, None)]
        return [PaddedBatch.build(self.subset(g), self._flat_rows(g)) for g in groups]

    @cached_property
    def fused(self) -> "FusedLayout":
        """The batch as flat index tensors for the fused CPU kernel; built on first use, shared by all layers."""
        return FusedLayout.build(self)

    def subset(self, seqs: list[int]) -> "AttentionMetadata":
        """The metadata of some sequences only (their rows renumbered from 0; no writes)."""
        cu = [0]
        for i in seqs:
            cu.append(cu[-1] + self.cu_seqlens_q[i + 1] - self.cu_seqlens_q[i])
        empty = self.write_rows[:0]
        return AttentionMetadata(
            cu_seqlens_q=cu,
            context_lens=[self.context_lens[i] for i in seqs],
            prefix_slots=[self.prefix_slots[i] for i in seqs],
            visibility=[self.visibility[i] for i in seqs],
            write_rows=empty,
            write_slots=self.write_slots[:0],
            num_kv_heads=self.num_kv_heads,
        )

    def _flat_rows(self, seqs: list[int]) -> torch.Tensor:
        return torch.cat([torch.arange(self.cu_seqlens_q[i], self.cu_seqlens_q[i + 1]) for i in seqs]).to(
            self.write_slots.device
        )


FUSED_ROW_BLOCK = 16  # = ROW_BLOCK in csrc/fused_attention.cpp: rows of a sequence per work item


@dataclass
class FusedLayout:
    """What the fused kernel (attention/fused.py) reads: every tensor int64 but the visibility bytes."""

    cu_q: torch.Tensor  # [B + 1] row offsets
    cu_ctx: torch.Tensor  # [B + 1] offsets into `prefix`
    prefix: torch.Tensor  # [sum ctx] cache slots of every sequence's prefix, in position order
    visibility: torch.Tensor  # [sum n_b^2] uint8: sequence b's [n_b, n_b] visibility, row-major
    cu_visibility: torch.Tensor  # [B + 1] offsets into `visibility`
    items: torch.Tensor  # [W, 2] the kernel's work: (sequence, first row of a block of FUSED_ROW_BLOCK rows)

    @classmethod
    def build(cls, meta: AttentionMetadata) -> "FusedLayout":
        counts = torch.tensor(meta.cu_seqlens_q, dtype=torch.long).diff()
        ctx = torch.tensor([0, *meta.context_lens], dtype=torch.long)
        prefix = torch.cat(meta.prefix_slots).long() if meta.prefix_slots else torch.empty(0, dtype=torch.long)
        return cls(
            cu_q=torch.tensor(meta.cu_seqlens_q, dtype=torch.long),
            cu_ctx=ctx.cumsum(0),
            prefix=prefix.cpu(),
            visibility=torch.cat([v.reshape(-1).cpu() for v in meta.visibility]).to(torch.uint8),
            cu_visibility=torch.cat([torch.zeros(1, dtype=torch.long), (counts * counts).cumsum(0)]),
            items=torch.tensor([(b, r) for b, n in enumerate(counts.tolist()) for r in range(0, n, FUSED_ROW_BLOCK)],
                               dtype=torch.long).reshape(-1, 2),
        )


# Keys per sequence are padded to a multiple of this. Elementwise kernels (torch.exp
# in the softmax) finish a contiguous range that is not a multiple of their vector
# width with scalar code, whose last bit can differ; with every row 64-aligned no
# element ever lands in such a tail, wherever its row sits in the batch.
KEY_ALIGN = 64
# Sequences are grouped by new-row count (<= 1, <= 8, <= 24, <= 64); each longer one (a prefill) is
# alone. Within a group every sequence is padded to the group's longest, so a decode row is never
# padded to a speculating sequence's 20 rows, nor anything to a prompt's length.
ROW_BUCKETS = (1, 8, 24, 64)


@dataclass
class PaddedBatch:
    """The ragged batch laid out for batched matmul attention.

    Sequence b's keys sit at [b, 0 .. ctx_b + n_b): its cached prefix in position
    order, then its n_b new rows in row order, so a key's index depends only on the
    sequence and never on what else is in the batch (this keeps every row's
    arithmetic batch-invariant). Padding keys read slot 0 and are masked.
    """

    num_seqs: int  # B
    max_rows: int  # n_max: query rows per sequence after padding
    max_keys: int  # L_max: keys per sequence after padding
    query_index: torch.Tensor | None  # [N] flat row -> b * n_max + r; None when no sequence is padded
    key_index: torch.Tensor  # [B * kvh * L_max] row of the cache viewed as [slots * kvh, d], per (b, head, key)
    new_key_index: torch.Tensor  # [N * kvh] (row, head) -> (b * kvh + head) * L_max + ctx_b + r
    hidden: torch.Tensor  # [B, 1, n_max, 1, L_max] bool: key j is NOT visible to query row r of b
    rows: torch.Tensor | None  # [N_g] flat rows of the whole step in this group; None: the group is the step

    @classmethod
    def build(cls, meta: AttentionMetadata, rows: torch.Tensor | None) -> "PaddedBatch":
        """Every index tensor and the mask, with tensor operations (no per-layer work)."""
        device = meta.write_slots.device
        counts = [meta.cu_seqlens_q[i + 1] - meta.cu_seqlens_q[i] for i in range(meta.num_seqs)]
        n_max = max(counts)
        l_max = -(-max(c + n for c, n in zip(meta.context_lens, counts)) // KEY_ALIGN) * KEY_ALIGN
        n = torch.tensor(counts, device=device)
        ctx = torch.tensor(meta.context_lens, device=device)
        seq_of_row = torch.repeat_interleave(torch.arange(meta.num_seqs, device=device), n)  # [N]
        row_in_seq = torch.arange(seq_of_row.numel(), device=device) - (torch.cumsum(n, 0) - n)[seq_of_row]
        ragged = any(c != n_max for c in counts)
        heads = torch.arange(meta.num_kv_heads, device=device)
        new_key = (seq_of_row[:, None] * meta.num_kv_heads + heads) * l_max + (ctx[seq_of_row] + row_in_seq)[:, None]
        return cls(
            num_seqs=meta.num_seqs,
            max_rows=n_max,
            max_keys=l_max,
            query_index=seq_of_row * n_max + row_in_seq if ragged else None,
            key_index=_key_index(meta, ctx, l_max),
            new_key_index=new_key.flatten(),
            hidden=~_mask(meta, n, ctx, n_max, l_max)[:, None, :, None, :],
            rows=rows,
        )


def _key_index(meta: AttentionMetadata, ctx: torch.Tensor, l_max: int) -> torch.Tensor:
    """[B * kvh * L_max]: (b, head, j) -> slot * kvh + head, with sequence b's prefix at j < ctx_b, slot 0 elsewhere."""
    device = ctx.device
    slots = torch.zeros(meta.num_seqs, l_max, dtype=torch.long, device=device)
    if sum(meta.context_lens):
        seq_of_key = torch.repeat_interleave(torch.arange(meta.num_seqs, device=device), ctx)
        pos = torch.arange(seq_of_key.numel(), device=device) - (torch.cumsum(ctx, 0) - ctx)[seq_of_key]
        slots[seq_of_key, pos] = torch.cat(meta.prefix_slots).to(device)
    heads = torch.arange(meta.num_kv_heads, device=device)
    return (slots[:, None, :] * meta.num_kv_heads + heads[None, :, None]).flatten()


def _mask(meta: AttentionMetadata, n: torch.Tensor, ctx: torch.Tensor, n_max: int, l_max: int) -> torch.Tensor:
    """[B, n_max, L_max]: the whole prefix, then the new rows allowed by each visibility matrix."""
    device = ctx.device
    vis = torch.stack([_pad_square(v.to(device), n_max) for v in meta.visibility])  # [B, n_max, n_max]
    col = torch.arange(l_max, device=device)[None, :] - ctx[:, None]  # [B, L_max]: index among new rows
    is_new = (col >= 0) & (col < n[:, None])
    index = col.clamp(0, n_max - 1)[:, None, :].expand(-1, n_max, -1)  # [B, n_max, L_max]
    mask = vis.gather(2, index) & is_new[:, None, :]
    mask |= (col < 0)[:, None, :]
    mask[:, :, 0] |= torch.arange(n_max, device=device)[None, :] >= n[:, None]  # padding rows see key 0
    return mask


def _pad_square(v: torch.Tensor, size: int) -> torch.Tensor:
    """v [n, n] zero-padded to [size, size]."""
    pad = size - v.shape[0]
    return torch.nn.functional.pad(v, (0, pad, 0, pad)) if pad else v
