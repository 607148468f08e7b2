"""Prefix caching in the engine's own scheduler (kv_cache.BlockManager, Scheduler): computed prompt blocks are
reused by later prompts with the same leading tokens, and no output changes. The reference is the same engine
with prefix caching off, i.e. every prompt computed from its first token."""

from __future__ import annotations

import random

import pytest

from tgi_space.config import SpacePolicy
from tgi_space.kv_cache import BlockManager, OutOfBlocks
from tgi_space.llm import LLM
from tgi_space.sampling import SamplingParams

BS = 4
# A pinned latency curve and a row budget that never binds: the governor's and SDSAT's choices (which depend on
# measured times, and on the rows a step's prompts leave) are the same with and without cache hits, so sampled
# requests draw the same random numbers in both engines and their tokens can be compared exactly.
POLICY = SpacePolicy(k_max=3, latency_curve={1: 0.001, 64: 0.002}, max_step_query_tokens=4096)


def registered(bm: BlockManager, seq_id: int, prompt: list[int], tokens: int) -> None:
    """seq_id takes fresh blocks for `tokens` tokens and its prompt is registered (as once computed)."""
    bm.allocate(seq_id, tokens)
    bm.register_computed(seq_id, prompt)


# ---- the block manager ----------------------------------------------------------------------------------


def test_a_prompt_finds_the_longest_run_of_its_full_blocks_and_leaves_its_last_token():
    bm = BlockManager(num_blocks=16, block_size=BS, prefix_caching=True)
    prompt = list(range(10, 22))  # 3 full blocks
    registered(bm, 1, prompt, 14)
    table = bm.block_tables[1]
    assert bm.cached_prefix(prompt + [99]) == table[:3]  # 13 tokens: 3 blocks, 1 token left to compute
    assert bm.cached_prefix(prompt) == table[:2]  # 12 tokens: the last block is computed again
    assert bm.cached_prefix(prompt[:8] + [7, 7, 7, 7, 7]) == table[:2]  # diverges in block 3
    assert bm.cached_prefix([0] + prompt) == []  # the same tokens shifted: no block starts the same
    assert bm.cached_prefix(prompt[:4]) == []  # one block and nothing after it


def test_a_block_is_keyed_by_everything_before_it_not_by_its_own_tokens():
    bm = BlockManager(num_blocks=16, block_size=BS, prefix_caching=True)
    registered(bm, 1, [1, 2, 3, 4, 5, 6, 7, 8], 9)
    assert bm.cached_prefix([5, 6, 7, 8, 5, 6, 7, 8, 0]) == []  # block 2's tokens at the start
    assert bm.cached_prefix([1, 2, 3, 4, 1, 2, 3, 4, 0]) == bm.block_tables[1][:1]  # block 1's tokens as block 2


def test_shared_blocks_stay_held_until_their_last_holder_ends_then_idle_and_count_as_free():
    bm = BlockManager(num_blocks=8, block_size=BS, prefix_caching=True)
    prompt = list(range(1, 10))  # 2 full blocks + 1 token
    registered(bm, 1, prompt, 10)
    prefix = bm.cached_prefix(prompt)
    assert len(prefix) == 2 and bm.num_free_blocks == 5
    bm.allocate(2, 12, prefix)  # 3 blocks, 2 of them shared: 1 new
    assert bm.block_tables[2][:2] == prefix and bm.num_free_blocks == 4
    bm.free(1)
    assert bm.num_free_blocks == 5  # the shared blocks are still held by 2; 1's last block is free
    bm.free(2)
    assert bm.num_free_blocks == 8 and bm.num_cached_blocks == 2  # idle, still readable
    assert bm.cached_prefix(prompt) == prefix


def test_idle_blocks_are_taken_back_least_recently_used_first_deepest_first_when_room_is_needed():
    bm = BlockManager(num_blocks=6, block_size=BS, prefix_caching=True)
    old, new = list(range(1, 10)), list(range(50, 59))
    registered(bm, 1, old, 9)
    bm.free(1)
    registered(bm, 2, new, 9)
    bm.free(2)
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 4  # 2 free, 4 idle
    bm.allocate(3, 12)  # 3 blocks: the 2 free ones, then the oldest prompt's deepest block
    assert bm.cached_prefix(old + [0]) == bm.cached_prefix(old)[:1] and len(bm.cached_prefix(old)) == 1
    assert len(bm.cached_prefix(new)) == 2
    bm.allocate(4, 8)  # 2 more: the old prompt's first block, then the new prompt's second
    assert bm.cached_prefix(old) == [] and len(bm.cached_prefix(new)) == 1
    assert bm.num_free_blocks == 1


def test_allocation_counts_idle_blocks_it_shares_once_and_changes_nothing_when_it_cannot_fit():
    bm = BlockManager(num_blocks=4, block_size=BS, prefix_caching=True)
    prompt = list(range(1, 10))
    registered(bm, 1, prompt, 9)
    bm.free(1)
    prefix = bm.cached_prefix(prompt)
    assert bm.can_allocate(16, prefix) and not bm.can_allocate(17, prefix)  # 2 shared + 2 new of 4
    with pytest.raises(OutOfBlocks):
        bm.allocate(2, 17, prefix)
    assert 2 not in bm.block_tables and bm.num_free_blocks == 4 and bm.cached_prefix(prompt) == prefix
    bm.allocate(2, 16, prefix)
    assert bm.num_free_blocks == 0 and bm.block_tables[2][:2] == prefix


def test_clearing_the_cache_forgets_idle_blocks_and_keeps_held_ones():
    bm = BlockManager(num_blocks=8, block_size=BS, prefix_caching=True)
    idle, held = list(range(1, 10)), list(range(50, 59))
    registered(bm, 1, idle, 9)
    registered(bm, 2, held, 9)
    bm.free(1)
    bm.clear_prefix_cache()
    assert bm.cached_prefix(idle) == [] and bm.cached_prefix(held) == bm.block_tables[2][:2]
    assert bm.num_free_blocks == 5 and bm.num_cached_blocks == 2
    bm.free(2)
    assert bm.num_free_blocks == 8


def test_without_prefix_caching_nothing_is_kept_or_found():
    bm = BlockManager(num_blocks=8, block_size=BS)
    registered(bm, 1, list(range(1, 10)), 10)
    bm.free(1)
    assert bm.cached_prefix(list(range(1, 10))) == [] and bm.num_cached_blocks == 0 and bm.num_free_blocks == 8


def test_an_equal_prompt_computed_twice_keeps_the_first_registration():
    bm = BlockManager(num_blocks=8, block_size=BS, prefix_caching=True)
    prompt = list(range(1, 10))
    registered(bm, 1, prompt, 9)
    registered(bm, 2, prompt, 9)  # admitted in the same step as 1: computed apart, so not shared
    assert bm.cached_prefix(prompt) == bm.block_tables[1][:2] and bm.num_cached_blocks == 2
    bm.free(2)
    assert bm.num_free_blocks == 8 - 3  # 2's blocks went back to the free list, not the cache
    bm.free(1)
    assert bm.num_free_blocks == 8


# ---- the engine: outputs equal an engine without the cache ----------------------------------------------


def _prompts(rng: random.Random, n: int, shared: int) -> list[list[int]]:
    preamble = [1] + [rng.randrange(4, 90) for _ in range(shared)]
    return [preamble + [rng.randrange(4, 90) for _ in range(rng.randrange(1, 12))] for _ in range(n)]


@pytest.fixture(scope="module")
def engines(llama_dir):
    options = dict(dtype="float32", kv_cache_bytes=2**22, block_size=BS, space=POLICY)
    return LLM(str(llama_dir), prefix_caching=True, **options), LLM(str(llama_dir), prefix_caching=False, **options)


@pytest.mark.parametrize("speculate", ["none", "space", "sdsat"])
def test_waves_sharing_a_preamble_hit_the_cache_and_match_the_engine_without_it(engines, speculate):
    cached, plain = engines
    rng = random.Random(7)
    prompts = _prompts(rng, 6, shared=17)
    params = [SamplingParams(max_new_tokens=16), SamplingParams(max_new_tokens=9, stop_token_ids=[5]),
              SamplingParams(max_new_tokens=16, do_sample=True, temperature=0.8, seed=3)] * 2
    expected = plain.generate(prompts, params, speculate=speculate)
    for wave in range(2):  # the first wave fills the cache (prompts admitted together compute their own)
        got = cached.generate(prompts, params, speculate=speculate)
        assert [o.token_ids for o in got] == [o.token_ids for o in expected]
        assert [[t.logprob for t in o.tokens] for o in got] == [[t.logprob for t in o.tokens] for o in expected]
    assert all(o.stats.cached_prompt_tokens >= 16 for o in got)  # the preamble's 4 full blocks at least
    assert all(o.stats.cached_prompt_tokens % BS == 0 and o.stats.cached_prompt_tokens < len(p)
               for o, p in zip(got, prompts))


def test_a_request_admitted_after_another_computed_its_prompt_shares_its_blocks_while_both_run(engines):
    cached, plain = engines
    engine = cached.engine
    prompt = _prompts(random.Random(11), 1, shared=21)[0]
    first = engine.add_request(prompt, SamplingParams(max_new_tokens=20))
    engine.step()
    engine.step()  # the first step computed the prompt; this one registered it
    second = engine.add_request(prompt + [40, 41], SamplingParams(max_new_tokens=20))
    engine.step()
    shared = engine.block_manager.block_tables[first.seq_id][: len(prompt) // BS]  # its full prompt blocks
    assert engine.block_manager.block_tables[second.seq_id][: len(shared)] == shared
    while engine.has_unfinished():
        engine.step()
    ref = plain.generate([prompt, prompt + [40, 41]], SamplingParams(max_new_tokens=20))
    assert [first.output_ids, second.output_ids] == [o.token_ids for o in ref]
    assert second.stats.cached_prompt_tokens == len(shared) * BS


def test_prompt_logprobs_are_computed_from_every_prompt_token_never_from_the_cache(engines):
    cached, plain = engines
    prompt = _prompts(random.Random(5), 1, shared=20)[0]
    cached.generate([prompt], SamplingParams(max_new_tokens=2))
    params = SamplingParams(max_new_tokens=4, prompt_logprobs=True)
    got, ref = cached.generate([prompt], params)[0], plain.generate([prompt], params)[0]
    assert got.stats.cached_prompt_tokens == 0
    assert got.stats.prompt_logprobs[1:] == ref.stats.prompt_logprobs[1:] and got.token_ids == ref.token_ids


def test_preemption_and_cancellations_under_a_tiny_cache_keep_outputs_and_give_every_block_back(llama_dir):
    options = dict(dtype="float32", block_size=BS, space=POLICY)
    tight = LLM(str(llama_dir), kv_cache_bytes=2**15, prefix_caching=True, **options)
    roomy = LLM(str(llama_dir), kv_cache_bytes=2**22, prefix_caching=False, **options)
    engine, bm = tight.engine, tight.engine.block_manager
    start = bm.num_free_blocks
    rng = random.Random(3)
    prompts = _prompts(rng, 8, shared=13)
    params = SamplingParams(max_new_tokens=20)
    expected = {tuple(p): o.token_ids for p, o in zip(prompts, roomy.generate(prompts, params))}
    for round_ in range(3):
        seqs = [engine.add_request(p, params, rng.choice(["space", "sdsat", "none"])) for p in prompts]
        doomed = rng.sample(seqs, 2)
        for step in range(1000):
            if not engine.has_unfinished():
                break
            if step == 3 + round_:
                for seq in doomed:
                    engine.abort(seq)
            engine.step()
        for prompt, seq in zip(prompts, seqs):
            if seq not in doomed:
                assert seq.output_ids == expected[tuple(prompt)]
                assert seq.stats.cached_prompt_tokens < len(prompt)  # a recompute's generated tokens are not prompt
        assert bm.num_free_blocks == start and not bm.block_tables
    assert engine.scheduler.num_preemptions > 0 and bm.cached_tokens_served > 0


# ---- prompts computed in chunks (max_num_batched_tokens) -------------------------------------------------


@pytest.mark.parametrize("speculate", ["none", "space", "sdsat"])
@pytest.mark.parametrize("prefix_caching", [False, True])
def test_prompts_over_the_step_budget_are_computed_in_chunks_with_the_same_outputs(llama_dir, engines, speculate,
                                                                                   prefix_caching):
    _, plain = engines
    chunked = LLM(str(llama_dir), dtype="float32", kv_cache_bytes=2**22, block_size=BS, space=POLICY,
                  max_num_batched_tokens=7, prefix_caching=prefix_caching)
    rng = random.Random(13)
    prompts = _prompts(rng, 5, shared=22)
    params = [SamplingParams(max_new_tokens=12), SamplingParams(max_new_tokens=12, do_sample=True, temperature=0.9,
                                                                 seed=5)] * 2 + [SamplingParams(max_new_tokens=3)]
    expected = plain.generate(prompts, params, speculate=speculate)
    engine = chunked.engine
    seqs = [engine.add_request(p, q, speculate) for p, q in zip(prompts, params)]
    partial_steps = 0
    while engine.has_unfinished():
        planned = engine._speculate_whole(engine.scheduler.schedule())
        prompt_rows = sum(len(p.chain) for _, p in planned if len(p.chain) - p.num_candidates > 1 or p.partial)
        assert prompt_rows <= 7 + len(planned)  # the budget, and one token for each prompt that got nothing
        partial_steps += sum(p.partial for _, p in planned)
        results = engine.execute(planned, engine.block_manager)
        assert all(not emitted for (_, p), (_, emitted) in zip(planned, results) if p.partial)
        for seq, _ in results:
            if seq.is_finished:
                engine.scheduler.finish(seq)
    assert partial_steps > 0
    assert [s.output_ids for s in seqs] == [o.token_ids for o in expected]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_long_prompt_joins_a_busy_batch_in_chunks_instead_of_waiting_for_it_to_empty(llama_dir, engines):
    _, plain = engines
    chunked = LLM(str(llama_dir), dtype="float32", kv_cache_bytes=2**22, block_size=BS, space=POLICY,
                  max_num_batched_tokens=8)
    engine = chunked.engine
    short = [engine.add_request([1, 5 + i, 6], SamplingParams(max_new_tokens=40)) for i in range(3)]
    engine.step()
    long_prompt = _prompts(random.Random(17), 1, shared=30)[0]
    late = engine.add_request(long_prompt, SamplingParams(max_new_tokens=4))
    steps, first_token_at = 0, None
    while not late.is_finished:
        engine.step()
        steps += 1
        first_token_at = first_token_at or (steps if late.output_ids else None)
    assert not any(s.is_finished for s in short)  # it finished while they were still running
    assert first_token_at == -(-len(long_prompt) // 8)  # its prompt took one 8-token chunk per step
    assert steps <= -(-len(long_prompt) // 8) + 4  # one chunk per step, then its tokens
    assert late.output_ids == plain.generate([long_prompt], SamplingParams(max_new_tokens=4))[0].token_ids


def test_a_prompt_asking_for_its_log_probabilities_is_computed_whole_and_they_match(llama_dir, engines):
    _, plain = engines
    chunked = LLM(str(llama_dir), dtype="float32", kv_cache_bytes=2**22, block_size=BS, space=POLICY,
                  max_num_batched_tokens=6)
    prompt = _prompts(random.Random(19), 1, shared=20)[0]
    params = SamplingParams(max_new_tokens=5, prompt_logprobs=True)
    got, ref = chunked.generate([prompt], params)[0], plain.generate([prompt], params)[0]
    assert got.stats.prompt_logprobs[1:] == ref.stats.prompt_logprobs[1:] and got.token_ids == ref.token_ids


@pytest.mark.parametrize("speculate", ["none", "space", "sdsat"])
def test_the_next_turn_reads_the_answer_it_repeats_from_the_cache_and_matches(engines, speculate):
    """A chat's next prompt repeats the last prompt and its answer: the answer's blocks (K/V written by decode
    or tree steps, the same bits a prefill gives) are read from the cache, and nothing changes."""
    cached, plain = engines
    rng = random.Random(23 + len(speculate))
    prompt = _prompts(rng, 1, shared=10)[0]
    params = [SamplingParams(max_new_tokens=21), SamplingParams(max_new_tokens=9, do_sample=True, temperature=0.8,
                                                                 seed=11)]
    answer = cached.generate([prompt], params[:1], speculate=speculate)[0].token_ids
    assert answer == plain.generate([prompt], params[:1], speculate=speculate)[0].token_ids
    turn = prompt + answer + [rng.randrange(4, 90) for _ in range(3)]
    got = cached.generate([turn, turn], params, speculate=speculate)
    expected = plain.generate([turn, turn], params, speculate=speculate)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert [[t.logprob for t in o.tokens] for o in got] == [[t.logprob for t in o.tokens] for o in expected]
    computed = (len(prompt) + len(answer) - 1) // BS * BS  # the first turn's K/V (its last token has none)
    assert got[0].stats.cached_prompt_tokens >= min(computed, (len(turn) - 1) // BS * BS) > len(prompt)
