"""Prefix caching (Info.use_prefix_caching, TGI_SPACE_PREFIX_CACHING=1): the router keeps the full blocks of ended
prompts and sends a later request with the same prompt start the cached blocks' slots and cache_len; the shard
computes only the rest of the prompt. Outputs must stay those of plain decoding (the engine gives a row the same
K/V bits whichever step computed it), and the router's blocks must all come back."""

from __future__ import annotations

import grpc
import pytest

from tests.router_emulation import TGI_ADMISSION, EmuRequest, InProcessShard, PrefixAllocator, pb2
from tests.test_shard_server import K, assert_same, offline, options, words
from tgi_space.config import SpacePolicy
from tgi_space.engine import Engine
from tgi_space.llm import LLM
from tgi_space.server.options import from_launcher


SHARDS = {  # name -> (speculate mode, planned, prefill chunking)
    "fixed": ("space", False, True), "planned": ("space", True, True), "sdsat": ("sdsat", True, True),
    "unchunked": ("space", True, False),
}


@pytest.fixture(scope="module", params=list(SHARDS))
def shard(request, llama_dir, tmp_path_factory):
    mode, planned, chunking = SHARDS[request.param]
    opts = options(llama_dir, tmp_path_factory.mktemp("sock") / "tgi", mode, chunking, prefix_caching=True)
    opts.planner = planned
    server = InProcessShard(opts)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(str(llama_dir), dtype="float32", kv_cache_bytes=2**22, block_size=4, space=SpacePolicy(k_max=K))


def shared_prefix_requests() -> list[EmuRequest]:
    """Prompts that start alike (a 13-token head, so 3 full blocks of 4), exact repeats of earlier prompts, and
    unrelated ones; later arrivals find what earlier ones left."""
    head = words(11, 13)
    requests = []
    for i in range(12):
        prompt = [f"{head} {words(40 + 3 * i, 2 + i % 4)}", words(11, 16), words(60 + i, 5)][i % 3]
        r = EmuRequest(prompt, max_new_tokens=6 + (i * 5) % 11, arrival=3 * (i // 2))
        if i % 4 == 1:
            r.parameters = {"repetition_penalty": 1.3}
        elif i % 4 == 2:
            r.stop_sequences = ["w8"]
        requests.append(r)
    return requests


class Spy:
    """The cache_len of every prefilled request, and the num_cached of each engine sequence's first plan."""

    def __init__(self, emu, monkeypatch) -> None:
        self.cache_lens: list[int] = []
        self.first_cached: dict[int, int] = {}
        call = emu._call

        def recording(name, request):
            if name == "Prefill":
                self.cache_lens += [r.cache_len for r in request.batch.requests]
            return call(name, request)

        emu._call = recording
        execute = Engine.execute

        def spying(engine, planned, *args, **kwargs):
            for seq, plan in planned:
                self.first_cached.setdefault(seq.seq_id, plan.num_cached)
            return execute(engine, planned, *args, **kwargs)

        monkeypatch.setattr(Engine, "execute", spying)


def blocks_accounted(emu) -> bool:
    """Every router block is free or cached, and no cached block is still read by anyone."""
    alloc = emu.allocator
    held = [n.block for n in alloc.cached.values()]
    return (sorted(alloc.free_blocks + held) == list(range(1, alloc.num_blocks))
            and all(n.readers == 0 for n in alloc.cached.values()))


@pytest.mark.parametrize("limits", [{}, {"max_prefill_tokens": 12, **TGI_ADMISSION}], ids=["default", "cut"])
def test_prefix_cached_prompts_decode_as_plain_decoding(shard, llm, limits, monkeypatch):
    if limits and not shard.options.prefill_chunking:
        pytest.skip("without chunking a prompt over the prefill budget is never admitted (TGI refuses such limits)")
    emu = shard.router(**limits)
    assert emu.info.use_prefix_caching and isinstance(emu.allocator, PrefixAllocator)
    spy = Spy(emu, monkeypatch)
    requests = shared_prefix_requests()
    results = emu.run(requests)
    emu.close()
    assert sum(n > 0 for n in spy.cache_lens) >= 4  # heads and repeats were found in the cache
    assert sorted(spy.first_cached.values()) == sorted(spy.cache_lens)  # what was cached was not computed again
    assert_same(results, offline(llm, emu, requests))
    assert blocks_accounted(emu) and shard.shard.cache == {}


def test_a_whole_cached_prompt_computes_its_last_token(shard, llm, monkeypatch):
    """A repeat of a prompt of whole blocks: cache_len is its length less one (one row gives the first token)."""
    emu = shard.router()
    spy = Spy(emu, monkeypatch)
    prompt = words(5, 12)  # 12 tokens: 3 full blocks
    requests = [EmuRequest(prompt, max_new_tokens=5), EmuRequest(prompt, max_new_tokens=7, arrival=12)]
    results = emu.run(requests)
    emu.close()
    assert len(emu.prompt_ids(requests[0])) == 12 and spy.cache_lens == [0, 11]
    assert_same(results, offline(llm, emu, requests))
    assert blocks_accounted(emu)


def test_cached_blocks_are_evicted_when_the_cache_runs_short():
    alloc = PrefixAllocator(num_blocks=6, block_size=2)  # blocks 1..5
    blocks, _, cache_len, shared = alloc.allocate_prompt(5, [1, 2, 3, 4])
    assert (cache_len, shared) == (0, 0)
    alloc.release(blocks, shared, [1, 2, 3, 4], keep=True)  # [1, 2] and [1, 2, 3, 4] cached, one block freed
    assert len(alloc.cached) == 2 and len(alloc.free_blocks) == 3
    again = alloc.allocate_prompt(5, [1, 2, 3, 9])  # reads [1, 2]: cache_len 2
    assert again[2:] == (2, 1)
    assert alloc.allocate_prompt(6, [7, 7]) is None  # 3 blocks: only 2 free, the read prefix cannot be evicted
    b2, _, c2, s2 = alloc.allocate_prompt(4, [7, 7])  # 2 blocks: the unread [1, 2, 3, 4] block is evicted
    assert (c2, s2) == (0, 0) and list(alloc.cached) == [(1, 2)] and alloc.free_blocks == []
    alloc.release(again[0], again[3], [1, 2, 3, 9], keep=False)
    alloc.release(b2, s2, [7, 7], keep=False)
    assert sorted(alloc.free_blocks + [n.block for n in alloc.cached.values()]) == [1, 2, 3, 4, 5]


def _request(emu, prompt: str, cache_len: int, prefill_logprobs: bool = False):
    req = EmuRequest(prompt, max_new_tokens=4, prefill_logprobs=prefill_logprobs)
    n = len(emu.prompt_ids(req)) + req.max_new_tokens + emu.info.speculate - 1
    blocks, slots = emu.allocator.allocate(n)
    return emu.request_pb(next(emu.request_ids), req, blocks, slots, cache_len)


def _refused(emu, request, field: str) -> str:
    batch = pb2.Batch(id=next(emu.batch_ids), requests=[request], size=1, max_tokens=len(request.slots))
    with pytest.raises(grpc.RpcError) as info:
        emu.stub.Prefill(pb2.PrefillRequest(batch=batch))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in info.value.details()
    return info.value.details()


def test_bad_cache_len_is_refused_naming_the_field(shard, llama_dir, tmp_path_factory):
    emu = shard.router()
    detail = _refused(emu, _request(emu, words(3, 8), cache_len=8), "cache_len")
    assert "0..7" in detail
    _refused(emu, _request(emu, words(3, 8), cache_len=4, prefill_logprobs=True), "prefill_logprobs")
    assert shard.shard.cache == {}
    emu.close()
    plain = InProcessShard(options(llama_dir, tmp_path_factory.mktemp("sock") / "tgi"))
    try:
        emu = plain.router()
        assert not emu.info.use_prefix_caching
        assert "TGI_SPACE_PREFIX_CACHING" in _refused(emu, _request(emu, words(3, 8), cache_len=4), "cache_len")
        emu.close()
    finally:
        plain.stop()


def test_shared_prompt_slots_are_allowed_and_a_live_requests_own_slots_are_not(shard):
    emu = shard.router()
    live = _request(emu, words(3, 8), cache_len=0)
    first = emu.stub.Prefill(pb2.PrefillRequest(batch=pb2.Batch(id=next(emu.batch_ids), requests=[live], size=1)))
    reader = _request(emu, words(3, 8) + " w50", cache_len=8)
    reader.slots[:8] = live.slots[:8]  # the same prompt start: the same (read-only) slots
    shared = emu.stub.Prefill(pb2.PrefillRequest(batch=pb2.Batch(id=next(emu.batch_ids), requests=[reader], size=1)))
    thief = _request(emu, words(3, 9), cache_len=0)
    thief.slots[2] = live.slots[8]  # a slot the live request decodes into
    _refused(emu, thief, "slots")
    for batch in (first, shared):
        emu.stub.ClearCache(pb2.ClearCacheRequest(id=batch.batch.id))
    assert shard.shard.cache == {}
    emu.close()


def test_prefix_caching_is_on_unless_its_variable_turns_it_off(llama_dir, tmp_path):
    assert from_launcher(str(llama_dir), uds_path=str(tmp_path / "s"), env={}).prefix_caching is True
    for off in ("0", "false"):
        env = {"TGI_SPACE_PREFIX_CACHING": off}
        assert from_launcher(str(llama_dir), uds_path=str(tmp_path / "s"), env=env).prefix_caching is False
    with pytest.raises(ValueError, match="TGI_SPACE_PREFIX_CACHING"):
        from_launcher(str(llama_dir), uds_path=str(tmp_path / "s"), env={"TGI_SPACE_PREFIX_CACHING": "maybe"})
