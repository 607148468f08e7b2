"""TGI's green-list watermark (Kirchenbauer et al. 2023), applied per position.

For each position, a generator seeded with `15485863 * previous_token` draws a
permutation of the vocabulary; its first `int(V * gamma)` ids are "green" and
get `delta` added to their logits. Unlike TGI's batched version (which uses the
last column of a padded id matrix for every speculative row), the previous token
here is the true one of each row, so speculation does not change the output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

HASH_KEY = 15485863  # TGI's (and the paper's) seeding constant


@dataclass(frozen=True)
class Watermark:
    """Green-list strength: a `gamma` fraction of the vocabulary gets `+delta`."""

    gamma: float = 0.5
    delta: float = 2.0

    def __post_init__(self) -> None:
        if not 0.0 < self.gamma < 1.0:
            raise ValueError(f"WATERMARK_GAMMA must be in (0, 1), got {self.gamma}")
        if self.delta < 0.0:
            raise ValueError(f"WATERMARK_DELTA must be >= 0, got {self.delta}")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Watermark":
        """Settings from WATERMARK_GAMMA / WATERMARK_DELTA (TGI's defaults 0.5 / 2.0)."""
        env = os.environ if env is None else env
        return cls(float(env.get("WATERMARK_GAMMA", 0.5)), float(env.get("WATERMARK_DELTA", 2.0)))

    def green_list(self, previous_token: int, vocab_size: int, device: torch.device) -> torch.Tensor:
        """Green token ids [int(V * gamma)] after previous_token."""
        generator = torch.Generator(device=device).manual_seed(HASH_KEY * int(previous_token))
        order = torch.randperm(vocab_size, generator=generator, device=device)
        return order[: int(vocab_size * self.gamma)]

    def apply(self, logits: torch.Tensor, history: list[int], extra: list[int]) -> torch.Tensor:
        """Watermarked copy of logits [R, V]; row r follows the context `history + extra[:r]`."""
        out = logits.clone()
        context = list(history) + list(extra)
        for r in range(logits.shape[0]):
            previous = context[len(history) + r - 1]
            out[r, self.green_list(previous, logits.shape[-1], logits.device)] += self.delta
        return out
