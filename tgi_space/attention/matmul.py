"""Batched matmul attention for the whole ragged batch: the CPU default, batch-invariant in bf16.

All sequences go through one pair of batched matmuls, padded to [B, n_max] query
rows and [B, L_max] keys (`PaddedBatch`). Every op is chosen so that a row gets
the same bits whatever else is in the batch, for bf16 on CPU (oneDNN):

- scores: a bf16 matmul, reduced over head_dim only; oneDNN's bf16 matmul gives
  each output element the same bits whatever M and N are;
- softmax numerators exp(s - max) in float32, elementwise (max is exact in any order);
- the denominator is not a float32 `sum` (whose reduction order depends on the
  padded length) but comes out of the same bf16 matmul as the numerators: V gets
  a column of ones, so column d of P @ [V | 1] is sum(P). Masked keys contribute
  exact zeros, and a key's index never depends on the batch, so the K-reduction
  sees the same nonzero terms in the same places.

In float32 the same code runs through MKL, whose results vary in the last bits
with the matrix shapes; greedy equality there holds up to float non-associativity.
"""

from __future__ import annotations

import torch

from tgi_space.attention.metadata import AttentionMetadata, PaddedBatch


class MatmulBackend:
    """One batched attention for every sequence of the step (no per-sequence loop)."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Attention output [N, num_heads, head_dim]; stores kept rows' K/V first."""
        new = torch.stack((k, v))  # [2, N, kvh, d]
        kept = new if meta.write_rows.numel() == new.shape[1] else new.index_select(1, meta.write_rows)
        kv_cache.index_copy_(1, meta.write_slots, kept)
        groups = meta.padded
        if len(groups) == 1:
            return group_attention(q, new, kv_cache, groups[0], scale)
        out = torch.empty_like(q)
        for group in groups:
            group_q, group_new = q.index_select(0, group.rows), new.index_select(1, group.rows)
            out.index_copy_(0, group.rows, group_attention(group_q, group_new, kv_cache, group, scale))
        return out


def group_attention(
    q: torch.Tensor, new: torch.Tensor, kv_cache: torch.Tensor, pb: PaddedBatch, scale: float
) -> torch.Tensor:
    """One padded group: gather its keys (cached prefix, then its new rows), then attend."""
    num_slots, kvh, d = kv_cache.shape[1:]
    keys = kv_cache.view(2, num_slots * kvh, d).index_select(1, pb.key_index)  # [2, B * kvh * L, d]
    keys.index_copy_(1, pb.new_key_index, new.reshape(2, -1, d))
    return padded_attention(q, keys.view(2, pb.num_seqs, kvh, pb.max_keys, d), pb, scale)


def padded_attention(q: torch.Tensor, kv: torch.Tensor, pb: PaddedBatch, scale: float) -> torch.Tensor:
    """q [N, h, d] against padded kv [2, B, kvh, L, d] where not pb.hidden; out [N, h, d]."""
    h, d = q.shape[1:]
    b, kvh, length = kv.shape[1:4]
    rows, group = pb.max_rows, h // kvh
    if pb.query_index is not None:
        q = q.new_zeros(b * rows, h, d).index_copy_(0, pb.query_index, q)
    q = q.view(b, rows, kvh, group, d).permute(0, 2, 1, 3, 4).reshape(b, kvh, rows * group, d)
    values = torch.cat((kv[1], kv.new_ones(b, kvh, length, 1)), dim=-1)  # [B, kvh, L, d + 1]
    scores = torch.matmul(q, kv[0].transpose(-1, -2)).float().mul_(scale).view(b, kvh, rows, group, length)
    scores.masked_fill_(pb.hidden, float("-inf"))
    probs = scores.sub_(scores.amax(-1, keepdim=True)).exp_().to(q.dtype).view(b, kvh, rows * group, length)
    out = torch.matmul(probs, values)  # [B, kvh, rows * group, d + 1]: numerators, then the denominator
    out = (out[..., :d] / out[..., d:]).view(b, kvh, rows, group, d).permute(0, 2, 1, 3, 4).reshape(b * rows, h, d)
    return out if pb.query_index is None else out.index_select(0, pb.query_index)
