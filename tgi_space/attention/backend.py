"""The attention backend interface and its selection by configuration."""

from __future__ import annotations

from typing import Protocol

import torch

from tgi_space.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    """Stores the new K/V in the paged cache, then attends each new row to its visible keys."""

    def forward(
        self,
        q: torch.Tensor,  # [N, num_heads, head_dim]
        k: torch.Tensor,  # [N, num_kv_heads, head_dim]
        v: torch.Tensor,  # [N, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_slots, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [N, num_heads, head_dim]
        ...


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> None:
    """Copy the K/V of the rows that are kept into their cache slots."""
    if meta.write_rows.numel():
        kv_cache[0].index_copy_(0, meta.write_slots, k.index_select(0, meta.write_rows))
        kv_cache[1].index_copy_(0, meta.write_slots, v.index_select(0, meta.write_rows))


def make_backend(name: str) -> AttentionBackend:
    """The backend named in the engine configuration ('fused', 'matmul', 'sdpa' or 'flash')."""
    if name == "matmul":
        from tgi_space.attention.matmul import MatmulBackend

        return MatmulBackend()
    if name == "fused":
        from tgi_space.attention.fused import FusedBackend

        return FusedBackend()
    if name == "sdpa":
        from tgi_space.attention.sdpa import SdpaBackend

        return SdpaBackend()
    if name == "flash":
        from tgi_space.attention.flash import FlashBackend

        return FlashBackend()
    raise ValueError(f"attention_backend must be 'fused', 'matmul', 'sdpa' or 'flash', got {name!r}")
