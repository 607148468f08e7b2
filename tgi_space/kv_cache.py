"""Paged KV cache: fixed-size blocks, per-sequence block tables, check-then-commit allocation, and prefix
caching: the full blocks of computed tokens (prompts, and generated tokens once a request ends) stay readable,
keyed by their tokens, for later prompts that start the same way."""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque

import torch

from tgi_space.config import ModelConfig


class OutOfBlocks(RuntimeError):
    """The cache cannot hold what was asked; nothing was changed."""


class BlockManager:
    """Hands out cache blocks to sequences. Every method either fully succeeds or changes nothing.

    With prefix caching, `register_computed` keys each full block of computed tokens by its tokens and the
    blocks before it; `cached_prefix` finds a new prompt's longest run of such blocks, which `allocate` then
    shares (read-only: a sequence writes only after the tokens it was admitted with, and only full blocks of them
    are shared). A
    registered block nobody holds stays readable until its room is needed: it counts as free and is taken
    back least recently used first, deepest blocks of a prompt first."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.block_tables: dict[int, list[int]] = {}  # seq id -> its blocks, in order
        self._slot_tables: dict[int, torch.Tensor] = {}  # seq id -> the slots of all its blocks (`slots`)
        self._holders: dict[int, int] = {}  # block -> sequences holding it (only blocks held by several or cached)
        self._block_of: dict[tuple[int, tuple[int, ...]], int] = {}  # (parent's node, tokens) -> registered block
        self._node_of: dict[int, int] = {}  # registered block -> its node id (never reused: a child's key
        self._key_of: dict[int, tuple[int, tuple[int, ...]]] = {}  # names its parent's node, not its block)
        self._idle: OrderedDict[int, None] = OrderedDict()  # registered blocks nobody holds, oldest first
        self._nodes = itertools.count(1)  # node 0: the empty prefix
        self.cached_tokens_served = 0  # prompt tokens read from the cache instead of computed, since start

    @property
    def num_free_blocks(self) -> int:
        """Blocks not owned by any sequence (registered ones nobody holds included: taken back on demand)."""
        return len(self.free_blocks) + len(self._idle)

    @property
    def num_cached_blocks(self) -> int:
        """Registered blocks (held or not)."""
        return len(self._node_of)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def missing_blocks(self, seq_id: int, num_tokens: int) -> int:
        """Extra blocks seq_id needs so its table covers num_tokens tokens."""
        have = len(self.block_tables.get(seq_id, ()))
        return max(0, self.blocks_for(num_tokens) - have)

    def can_allocate(self, num_tokens: int, prefix: list[int] = ()) -> bool:
        """Whether a new sequence of num_tokens tokens fits now (sharing the cached blocks `prefix`)."""
        idle_in_prefix = sum(b in self._idle for b in prefix)
        return self.blocks_for(num_tokens) - len(prefix) <= self.num_free_blocks - idle_in_prefix

    def allocate(self, seq_id: int, num_tokens: int, prefix: list[int] = ()) -> None:
        """Give a new sequence blocks for num_tokens tokens, the first ones the cached blocks `prefix`
        (`cached_prefix`) and the rest new."""
        if seq_id in self.block_tables:
            raise ValueError(f"sequence {seq_id} already has blocks")
        if not self.can_allocate(num_tokens, prefix):
            raise OutOfBlocks(f"need {self.blocks_for(num_tokens) - len(prefix)} blocks, {self.num_free_blocks} free")
        for block in prefix:
            self._idle.pop(block, None)
            self._holders[block] = self._holders.get(block, 0) + 1
        fresh = max(0, self.blocks_for(num_tokens) - len(prefix))
        self.block_tables[seq_id] = list(prefix) + [self._take() for _ in range(fresh)]
        self.cached_tokens_served += len(prefix) * self.block_size

    def _take(self) -> int:
        """A free block: a never-registered one, else the least recently used registered one nobody holds."""
        if self.free_blocks:
            return self.free_blocks.popleft()
        block, _ = self._idle.popitem(last=False)
        self._unregister(block)
        return block

    def _unregister(self, block: int) -> None:
        del self._block_of[self._key_of.pop(block)]
        del self._node_of[block]
        self._holders.pop(block, None)

    def clear_prefix_cache(self) -> None:
        """Forget every idle registered block (they become plain free blocks); held ones stay shared."""
        while self._idle:
            block, _ = self._idle.popitem(last=False)
            self._unregister(block)
            self.free_blocks.append(block)

    def cached_prefix(self, prompt: list[int]) -> list[int]:
        """The registered blocks that hold the longest run of `prompt`'s full blocks from its start, leaving at
        least its last token to compute (its logits give the first new token)."""
        if not self.prefix_caching:
            return []
        out, node, bs = [], 0, self.block_size
        for i in range((len(prompt) - 1) // bs):
            block = self._block_of.get((node, tuple(prompt[i * bs : (i + 1) * bs])))
            if block is None:
                break
            out.append(block)
            node = self._node_of[block]
        return out

    def register_computed(self, seq_id: int, tokens: list[int]) -> None:
        """seq_id's first len(tokens) tokens have their K/V in its blocks: key its full blocks among them (not a
        block the sequence goes on writing) for later prompts. Blocks whose tokens are registered already (computed
        apart, by a request admitted beside it) stay its own."""
        if not self.prefix_caching:
            return
        node, bs, table = 0, self.block_size, self.block_tables[seq_id]
        for i in range(len(tokens) // bs):
            key = (node, tuple(tokens[i * bs : (i + 1) * bs]))
            block = self._block_of.get(key)
            if block is None and table[i] not in self._node_of:
                block = table[i]
                self._block_of[key], self._key_of[block], self._node_of[block] = block, key, next(self._nodes)
                self._holders[block] = self._holders.get(block, 0) + 1
            if block != table[i]:
                return  # computed apart from an equal registered block: the rest is keyed under that one
            node = self._node_of[block]

    def can_append(self, seq_id: int, num_tokens: int) -> bool:
        """Whether seq_id can grow to hold num_tokens tokens in total."""
        return self.missing_blocks(seq_id, num_tokens) <= self.num_free_blocks

    def append(self, seq_id: int, num_tokens: int) -> None:
        """Grow seq_id's table to hold num_tokens tokens in total."""
        missing = self.missing_blocks(seq_id, num_tokens)
        if missing > self.num_free_blocks:
            raise OutOfBlocks(f"sequence {seq_id} needs {missing} more blocks, {self.num_free_blocks} free")
        self.block_tables[seq_id].extend(self._take() for _ in range(missing))

    def free(self, seq_id: int) -> None:
        """Return every block of seq_id (no-op if it has none); registered ones stay readable while idle."""
        self._slot_tables.pop(seq_id, None)
        for block in reversed(self.block_tables.pop(seq_id, ())):  # a prompt's deepest blocks go first
            holders = self._holders.get(block, 1) - 1
            if holders > 0:
                self._holders[block] = holders
            elif block in self._node_of:
                self._holders.pop(block, None)
                self._idle[block] = None
            else:
                self._holders.pop(block, None)
                self.free_blocks.append(block)

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
