"""Reference attention on any device: prefix plus masked new rows through PyTorch SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tgi_space.attention.backend import write_kv
from tgi_space.attention.metadata import AttentionMetadata


class SdpaBackend:
    """One `scaled_dot_product_attention` call per sequence over [prefix | new rows]."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Attention output [N, num_heads, head_dim]; stores kept rows' K/V first."""
        write_kv(k, v, kv_cache, meta)
        out = torch.empty_like(q)
        for i in range(meta.num_seqs):
            rows = meta.rows(i)
            keys, values, mask = _visible_keys(k[rows], v[rows], kv_cache, meta, i)
            out[rows] = _sdpa(q[rows], keys, values, mask, scale)
        return out


def _visible_keys(
    k_new: torch.Tensor, v_new: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, i: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys/values [ctx + n, kvh, d] of sequence i and the mask [n, ctx + n] of its new rows."""
    vis = meta.visibility[i]  # [n, n]
    ctx = meta.context_lens[i]
    if ctx == 0:
        return k_new, v_new, vis
    slots = meta.prefix_slots[i]
    keys = torch.cat((kv_cache[0].index_select(0, slots), k_new))
    values = torch.cat((kv_cache[1].index_select(0, slots), v_new))
    mask = torch.cat((vis.new_ones(vis.shape[0], ctx), vis), dim=1)
    return keys, values, mask


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA with heads first and grouped-query attention. q [n, h, d], k/v [m, kvh, d], mask [n, m]."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out.transpose(0, 1)
