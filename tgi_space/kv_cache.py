"""Paged KV cache: fixed-size blocks, per-sequence block tables, check-then-commit allocation."""

from __future__ import annotations

from collections import deque

import torch

from tgi_space.config import ModelConfig


class OutOfBlocks(RuntimeError):
    """The cache cannot hold what was asked; nothing was changed."""


class BlockManager:
    """Hands out cache blocks to sequences. Every method either fully succeeds or changes nothing."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.block_tables: dict[int, list[int]] = {}  # seq id -> its blocks, in order
        self._slot_tables: dict[int, torch.Tensor] = {}  # seq id -> the slots of all its blocks (`slots`)

    @property
    def num_free_blocks(self) -> int:
        """Blocks not owned by any sequence."""
        return len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def missing_blocks(self, seq_id: int, num_tokens: int) -> int:
        """Extra blocks seq_id needs so its table covers num_tokens tokens."""
        have = len(self.block_tables.get(seq_id, ()))
        return max(0, self.blocks_for(num_tokens) - have)

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether a new sequence of num_tokens tokens fits now."""
        return self.blocks_for(num_tokens) <= self.num_free_blocks

    def allocate(self, seq_id: int, num_tokens: int) -> None:
        """Give a new sequence blocks for num_tokens tokens."""
        if seq_id in self.block_tables:
            raise ValueError(f"sequence {seq_id} already has blocks")
        if not self.can_allocate(num_tokens):
            raise OutOfBlocks(f"need {self.blocks_for(num_tokens)} blocks, {self.num_free_blocks} free")
        self.block_tables[seq_id] = [self.free_blocks.popleft() for _ in range(self.blocks_for(num_tokens))]

    def can_append(self, seq_id: int, num_tokens: int) -> bool:
        """Whether seq_id can grow to hold num_tokens tokens in total."""
        return self.missing_blocks(seq_id, num_tokens) <= self.num_free_blocks

    def append(self, seq_id: int, num_tokens: int) -> None:
        """Grow seq_id's table to hold num_tokens tokens in total."""
        missing = self.missing_blocks(seq_id, num_tokens)
        if missing > self.num_free_blocks:
            raise OutOfBlocks(f"sequence {seq_id} needs {missing} more blocks, {self.num_free_blocks} free")
        self.block_tables[seq_id].extend(self.free_blocks.popleft() for _ in range(missing))

    def free(self, seq_id: int) -> None:
        """Return every block of seq_id (no-op if it has none)."""
        self._slot_tables.pop(seq_id, None)
        self.free_blocks.extend(self.block_tables.pop(seq_id, ()))

    def slots(self, seq_id: int, start: int, stop: int) -> torch.Tensor:
        """Flat cache slots [stop - start] of token positions start..stop-1 of seq_id (a view of the slots of
        all its blocks, rebuilt only when its table has grown: a sequence's blocks never change while held)."""
        table = self._slot_tables.get(seq_id)
        blocks = self.block_tables[seq_id]
        if table is None or table.numel() < len(blocks) * self.block_size:
            block_ids = torch.tensor(blocks, dtype=torch.long)
            table = (block_ids[:, None] * self.block_size + torch.arange(self.block_size)).flatten()
            self._slot_tables[seq_id] = table
        if not 0 <= start <= stop <= table.numel():
            raise IndexError(f"sequence {seq_id}: positions {start}..{stop - 1} outside its {table.numel()} slots")
        return table[start:stop]


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of K and V for one token across all layers."""
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * elem


def allocate_kv_cache(
    config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: str, extra_slots: int = 0
) -> list[torch.Tensor]:
    """One [2, num_blocks * block_size + extra_slots, kv_heads, head_dim] tensor per layer (extra: scratch)."""
    shape = (2, num_blocks * block_size + extra_slots, config.num_key_value_heads, config.head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]


def available_memory(device: str) -> int:
    """Bytes free for the KV cache on `device` right now."""
    if str(device).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import os

    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
