"""Rotary position embeddings (default, linear and llama3 frequency scaling)."""

from __future__ import annotations

import functools

import math
from dataclasses import dataclass

import torch

from tgi_space.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """Per-pair rotation frequencies, after the checkpoint's rope scaling. [head_dim // 2]"""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        inv_freq = _llama3_scaled(inv_freq, scaling)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths divided by `factor`, short kept, smooth between."""
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    is_mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(is_mid, mid, out)


class RotaryEmbedding:
    """Precomputed cos/sin tables indexed by position; applied to q and k in place of HF's."""

    def __init__(self, config: ModelConfig, device: torch.device | str, dtype: torch.dtype) -> None:
        inv_freq = inverse_frequencies(config)
        # Positions can exceed the trained length by the mask rows of the last step.
        max_pos = config.max_position_embeddings + 64
        angles = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv_freq)
        self.cos = angles.cos().to(device=device, dtype=dtype)  # [max_pos, head_dim // 2]
        self.sin = angles.sin().to(device=device, dtype=dtype)
        self.cos32 = angles.cos().to(device=device, dtype=torch.float32)  # for the fused CPU kernel
        self.sin32 = angles.sin().to(device=device, dtype=torch.float32)

    def tables(self, positions: torch.Tensor) -> "RopeTables":
        """The step's cos/sin rows for positions [N], looked up once and reused by every layer."""
        return RopeTables(self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1), positions, self)

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x [N, heads, head_dim] (halves layout, as HF Llama) by positions [N]."""
        return self.tables(positions).rotate(x)


@dataclass
class RopeTables:
    """cos/sin of one step's positions: [N, 1, head_dim // 2] each."""

    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor | None = None  # [N], for the float32 tables the fused kernel reads
    owner: "RotaryEmbedding | None" = None

    @functools.cached_property
    def float32(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [N, head_dim // 2] in float32 (the fused CPU kernel's tables), looked up once per step."""
        return self.owner.cos32[self.positions], self.owner.sin32[self.positions]

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate x [N, heads, head_dim] (halves layout, as HF Llama)."""
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * self.cos - x2 * self.sin, x2 * self.cos + x1 * self.sin), dim=-1)
