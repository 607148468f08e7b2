"""Block manager check-then-commit, accounting after generate/cancel, and preemption under pressure."""

from __future__ import annotations

import random

import pytest

from tgi_space.config import SpacePolicy
from tgi_space.kv_cache import BlockManager, OutOfBlocks
from tgi_space.llm import LLM
from tgi_space.sampling import SamplingParams


def test_check_then_commit():
    bm = BlockManager(num_blocks=4, block_size=4)
    assert bm.can_allocate(16) and not bm.can_allocate(17)
    bm.allocate(1, 9)  # 3 blocks
    assert bm.num_free_blocks == 1
    with pytest.raises(OutOfBlocks):
        bm.allocate(2, 5)
    assert bm.num_free_blocks == 1 and 2 not in bm.block_tables  # nothing half-done
    assert bm.can_append(1, 16) and not bm.can_append(1, 17)
    with pytest.raises(OutOfBlocks):
        bm.append(1, 17)
    assert len(bm.block_tables[1]) == 3
    bm.append(1, 16)
    assert bm.num_free_blocks == 0
    bm.free(1)
    assert bm.num_free_blocks == 4


def test_slots_follow_the_block_table():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate(0, 4)
    bm.allocate(1, 10)
    table = bm.block_tables[1]
    assert bm.slots(1, 3, 6).tolist() == [table[0] * 4 + 3, table[1] * 4, table[1] * 4 + 1]


def test_slots_stay_right_as_tables_grow_and_blocks_change_hands():
    """slots() keeps each sequence's slot table between calls: it must follow appends, frees and reuse."""
    bm = BlockManager(num_blocks=6, block_size=4)
    by_hand = lambda seq, start, stop: [bm.block_tables[seq][p // 4] * 4 + p % 4 for p in range(start, stop)]
    bm.allocate(1, 4)
    bm.allocate(2, 4)
    assert bm.slots(1, 0, 4).tolist() == by_hand(1, 0, 4)
    bm.append(1, 9)  # two more blocks
    assert bm.slots(1, 0, 9).tolist() == by_hand(1, 0, 9)
    with pytest.raises(IndexError, match="sequence 1"):
        bm.slots(1, 0, 13)  # past its blocks
    bm.free(1)
    bm.free(2)
    bm.allocate(1, 8)  # the same id, other blocks (the freed ones come back in another order)
    assert bm.slots(1, 2, 8).tolist() == by_hand(1, 2, 8)


def live_blocks_needed(engine) -> int:
    bm = engine.block_manager
    return sum(len(t) for t in bm.block_tables.values())


def test_blocks_in_use_equal_live_needs_after_generate_and_cancel(llama_dir):
    llm = LLM(str(llama_dir), kv_cache_bytes=2**22, block_size=4, space=SpacePolicy(k_max=3))
    engine, bm = llm.engine, llm.engine.block_manager
    start = bm.num_free_blocks
    rng = random.Random(0)
    seqs = []
    for round_ in range(30):
        if rng.random() < 0.6:
            prompt = [1] + [rng.randrange(4, 90) for _ in range(rng.randrange(1, 30))]
            params = SamplingParams(max_new_tokens=rng.randrange(1, 20))
            seqs.append(engine.add_request(prompt, params, rng.choice(["space", "sdsat", "none"])))
        if seqs and rng.random() < 0.3:
            engine.abort(seqs.pop(rng.randrange(len(seqs))))
        engine.step()
        live = [s for s in seqs if not s.is_finished]
        assert set(bm.block_tables) <= {s.seq_id for s in live}
        for s in live:  # each live sequence holds exactly what its tokens need, no more than one step ahead
            if s.seq_id in bm.block_tables:
                held = len(bm.block_tables[s.seq_id])
                ahead = max(engine.k_max, engine.config.space.max_tree_depth)  # the planned step reserves a tree path
                assert bm.blocks_for(s.num_cached) <= held <= bm.blocks_for(len(s.tokens) + ahead + 1)
        assert bm.num_free_blocks + live_blocks_needed(engine) == start
    for s in seqs:
        engine.abort(s)
    while engine.has_unfinished():
        engine.step()
    assert bm.num_free_blocks == start


def test_preemption_under_a_tiny_cache_keeps_outputs(llama_dir):
    prompts = [[1] + list(range(5 + i, 25 + i)) for i in range(6)]
    params = SamplingParams(max_new_tokens=24)
    roomy = LLM(str(llama_dir), dtype="float32", kv_cache_bytes=2**22, block_size=4)
    ref = [o.token_ids for o in roomy.generate(prompts, params, speculate="none")]
    # 8 KiB per token here is 2 layers * 2 * 2 heads * 16 dims * 4 bytes = 512 bytes: 40 blocks of 4
    tight = LLM(str(llama_dir), dtype="float32", kv_cache_bytes=512 * 4 * 40, block_size=4, space=SpacePolicy(k_max=3))
    assert tight.engine.block_manager.num_blocks == 40
    outs = tight.generate(prompts, params, speculate="space")
    assert [o.token_ids for o in outs] == ref
    assert tight.engine.scheduler.num_preemptions > 0  # the cache really was too small
    assert tight.engine.block_manager.num_free_blocks == 40
