"""SAR-SFT batches: the "appended masks" construction of SPACE.md section 1.

Per example, with probability `p_ar` a plain causal-LM example; otherwise
`num_mask_blocks` blocks of `k` masks are appended after the sequence `y[0..L)`.
A block with start `s` sees `y[0..s)` and itself (causally); mask `j` sits at
position `s + j` and is trained to predict `y[s + j + 1]`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from tgi_space.train.data import Example, valid_mask_starts

IGNORE = -100  # target value for unsupervised positions (torch's cross_entropy default)


@dataclass
class Layout:
    """One example laid out for training (unpadded); T = L + num_blocks * k."""

    input_ids: list[int]  # [T] real tokens, then the mask blocks
    position_ids: list[int]  # [T]
    targets: list[int]  # [T] explicit next-token targets, IGNORE where unsupervised
    offsets: list[int]  # [T] 0 for real tokens, j+1 for mask j of a block
    visible: torch.Tensor  # [T, T] bool, visible[q, kv]
    starts: list[int]  # the s of each mask block (empty for an AR example)


def _ar_targets(ex: Example) -> list[int]:
    """Position i targets y[i+1] if that token is supervised."""
    ids, sup = ex.input_ids, ex.is_target
    return [ids[i + 1] if sup[i + 1] else IGNORE for i in range(len(ids) - 1)] + [IGNORE]


def layout_example(ex: Example, starts: Sequence[int], k: int, mask_id: int) -> Layout:
    """Lay out `ex` with one block of `k` masks per start in `starts` (none: plain causal)."""
    n = len(ex.input_ids)
    total = n + len(starts) * k
    visible = torch.zeros(total, total, dtype=torch.bool)
    visible[:n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
    input_ids, positions = list(ex.input_ids), list(range(n))
    targets, offsets = _ar_targets(ex), [0] * n
    for b, s in enumerate(starts):
        lo = n + b * k  # first row of this block
        visible[lo : lo + k, :s] = True
        visible[lo : lo + k, lo : lo + k] = torch.ones(k, k, dtype=torch.bool).tril()
        input_ids += [mask_id] * k
        positions += [s + j for j in range(k)]
        targets += [ex.input_ids[s + j + 1] for j in range(k)]
        offsets += [j + 1 for j in range(k)]
    return Layout(input_ids, positions, targets, offsets, visible, list(starts))


def additive_mask(visible: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Bool visibility [..., T, T] -> additive float mask (0 visible, dtype-min hidden)."""
    zero = torch.zeros((), dtype=dtype)
    return torch.where(visible, zero, torch.finfo(dtype).min)


class SpaceCollator:
    """Turns `Example`s into padded SAR-SFT batches for a HF causal LM.

    Batch keys: input_ids [B, T], attention_mask [B, 1, T, T] additive float,
    position_ids [B, T], targets [B, T] (explicit, already shifted),
    offsets [B, T] (0 real token, j+1 mask j, -1 padding).
    """

    def __init__(
        self,
        k: int,
        p_ar: float,
        mask_id: int,
        pad_id: int,
        num_mask_blocks: int = 4,
        seed: int = 0,
        mask_dtype: torch.dtype = torch.float32,
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not 0.0 <= p_ar <= 1.0:
            raise ValueError(f"p_ar must be in [0, 1], got {p_ar}")
        if num_mask_blocks < 1:
            raise ValueError(f"num_mask_blocks must be >= 1, got {num_mask_blocks}")
        self.k, self.p_ar, self.mask_id, self.pad_id = k, p_ar, mask_id, pad_id
        self.num_mask_blocks = num_mask_blocks
        self.mask_dtype = mask_dtype
        self.rng = random.Random(seed)

    def choose_starts(self, ex: Example) -> list[int]:
        """No starts with probability p_ar; otherwise distinct uniform valid starts, sorted."""
        if self.rng.random() < self.p_ar:
            return []
        valid = valid_mask_starts(ex.is_target, self.k)
        if not valid:
            raise ValueError(f"example has fewer than k+1={self.k + 1} supervised tokens; filter it first")
        return sorted(self.rng.sample(valid, min(self.num_mask_blocks, len(valid))))

    def __call__(self, examples: Sequence[Example | dict]) -> dict[str, torch.Tensor]:
        """Build one padded batch."""
        exs = [ex if isinstance(ex, Example) else Example(ex["input_ids"], ex["is_target"]) for ex in examples]
        layouts = [layout_example(ex, self.choose_starts(ex), self.k, self.mask_id) for ex in exs]
        return pad_layouts(layouts, self.pad_id, self.mask_dtype)


def pad_layouts(
    layouts: Sequence[Layout], pad_id: int, mask_dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Right-pad layouts to a common length; a pad row sees only itself (no all-masked row)."""
    size = max(len(lay.input_ids) for lay in layouts)
    batch = len(layouts)
    input_ids = torch.full((batch, size), pad_id, dtype=torch.long)
    position_ids = torch.zeros((batch, size), dtype=torch.long)
    targets = torch.full((batch, size), IGNORE, dtype=torch.long)
    offsets = torch.full((batch, size), -1, dtype=torch.long)
    visible = torch.eye(size, dtype=torch.bool).repeat(batch, 1, 1)
    for b, lay in enumerate(layouts):
        t = len(lay.input_ids)
        input_ids[b, :t] = torch.tensor(lay.input_ids)
        position_ids[b, :t] = torch.tensor(lay.position_ids)
        targets[b, :t] = torch.tensor(lay.targets)
        offsets[b, :t] = torch.tensor(lay.offsets)
        visible[b, :t, :t] = lay.visible
    return {
        "input_ids": input_ids,
        "attention_mask": additive_mask(visible, mask_dtype).unsqueeze(1),
        "position_ids": position_ids,
        "targets": targets,
        "offsets": offsets,
    }
