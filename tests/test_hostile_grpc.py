"""Hostile input over gRPC: INVALID_ARGUMENT naming the field, the live batch untouched, then normal service.

Issue 11, items 1 and 5 (the shard validates the router's bookkeeping). Each case runs beside a live
batch A; after the case A is decoded to its end and must give exactly the tokens of plain decoding.
"""

from __future__ import annotations

import itertools
import math

import grpc
import pytest

from tests.router_emulation import EmuRequest, InProcessShard, pb2
from tgi_space.config import SpacePolicy
from tgi_space.llm import LLM
from tgi_space.sampling import SamplingParams
from tgi_space.server.options import ServeOptions

K = 3
A_PROMPT, A_NEW = "w11 w12 w13 w14 w15", 8
ids = itertools.count(10_000)  # batch and request ids far from the emulation's own counters


@pytest.fixture(scope="module")
def shard(llama_dir, tmp_path_factory):
    options = ServeOptions(model_dir=str(llama_dir), uds_path=str(tmp_path_factory.mktemp("sock") / "tgi"),
                           block_size=4, kv_cache_bytes=2**20, k=K, speculate_mode="space")
    server = InProcessShard(options)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(llama_dir, shard):
    emu = shard.router()
    prompt = emu.prompt_ids(EmuRequest(A_PROMPT))
    emu.close()
    llm = LLM(str(llama_dir), kv_cache_bytes=2**22, block_size=4, space=SpacePolicy(k_max=K))
    return llm.generate([prompt], SamplingParams(max_new_tokens=A_NEW), speculate="none")[0].token_ids


class Live:
    """A router emulation with batch A prefilled and cached; helpers to build more requests beside it."""

    def __init__(self, shard) -> None:
        self.shard = shard
        self.emu = shard.router()
        self.a_request = self.request(EmuRequest(A_PROMPT, max_new_tokens=A_NEW))
        response = self.emu.stub.Prefill(pb2.PrefillRequest(batch=self.batch([self.a_request])))
        self.tokens = [t for g in response.generations for t in g.tokens.ids]
        self.a = response.batch

    def request(self, req: EmuRequest, rid: int | None = None):
        """A well-formed generate.v3.Request with slots taken from the router's allocator."""
        need = len(self.emu.prompt_ids(req)) + req.max_new_tokens + K - 1
        blocks, slots = self.emu.allocator.allocate(need)
        return self.emu.request_pb(next(ids) if rid is None else rid, req, blocks, slots)

    def ok_request(self, **parameters):
        return self.request(EmuRequest("w20 w21 w22", max_new_tokens=4, parameters=parameters))

    def batch(self, requests, batch_id: int | None = None):
        return pb2.Batch(id=next(ids) if batch_id is None else batch_id, requests=requests, size=len(requests),
                         max_tokens=sum(len(r.slots) for r in requests))

    def prefill(self, *requests, batch_id: int | None = None):
        return self.emu.stub.Prefill(pb2.PrefillRequest(batch=self.batch(list(requests), batch_id)))

    def finish_a(self) -> list[int]:
        """Decode A alone to its end; its tokens so far and after."""
        batch = self.a
        while batch is not None and batch.size:
            response = self.emu.stub.Decode(pb2.DecodeRequest(batches=[batch]))
            self.tokens += [t for g in response.generations for t in g.tokens.ids]
            batch = response.batch if response.HasField("batch") else None
        return self.tokens


def sampling(**overrides) -> dict:
    return {"do_sample": True, "seed": 3, **overrides}


def with_slots(live: Live, slots):
    r = live.ok_request()
    del r.slots[:]
    r.slots.extend(slots)
    return r


def set_field(message, field: str, value):
    setattr(message, field, value)
    return message


CASES = {
    # name: (call(live), text the INVALID_ARGUMENT details must contain)
    "temperature-tiny": (lambda L: L.prefill(L.ok_request(**sampling(temperature=1e-40))), "temperature"),
    "temperature-tiny-greedy-flag": (lambda L: L.prefill(L.ok_request(temperature=1e-40)), "temperature"),
    "temperature-nan": (lambda L: L.prefill(L.ok_request(temperature=math.nan)), "temperature"),
    "temperature-inf": (lambda L: L.prefill(L.ok_request(**sampling(temperature=math.inf))), "temperature"),
    "temperature-huge": (lambda L: L.prefill(L.ok_request(**sampling(temperature=1e30))), "temperature"),
    "repetition-tiny-sampling": (lambda L: L.prefill(L.ok_request(**sampling(repetition_penalty=1e-40))), "repetition_penalty"),
    "repetition-inf": (lambda L: L.prefill(L.ok_request(repetition_penalty=math.inf)), "repetition_penalty"),
    "repetition-nan": (lambda L: L.prefill(L.ok_request(repetition_penalty=math.nan)), "repetition_penalty"),
    "frequency-nan": (lambda L: L.prefill(L.ok_request(frequency_penalty=math.nan)), "frequency_penalty"),
    "top-p-nan": (lambda L: L.prefill(L.ok_request(**sampling(top_p=math.nan))), "top_p"),
    "typical-p-inf": (lambda L: L.prefill(L.ok_request(**sampling(typical_p=math.inf))), "typical_p"),
    "max-new-tokens-zero": (lambda L: L.prefill(with_zero_max_new(L)), "max_new_tokens"),
    "top-n-tokens-21": (lambda L: L.prefill(set_field(L.ok_request(), "top_n_tokens", 21)), "top_n_tokens"),
    "grammar": (lambda L: L.prefill(L.ok_request(grammar="[0-9]+", grammar_type=2)), "parameters.grammar"),
    "adapter-id": (lambda L: L.prefill(set_field(L.ok_request(), "adapter_id", "lora")), "adapter_id"),
    "chunk-len-zero": (lambda L: L.prefill(set_field(L.ok_request(), "chunk_len", 0)), "chunk_len"),
    "chunk-len-past-prompt": (lambda L: L.prefill(set_field(L.ok_request(), "chunk_len", 99)), "chunk_len"),
    "cache-len": (lambda L: L.prefill(set_field(L.ok_request(), "cache_len", 50)), "cache_len"),  # past the prompt
    "slot-outside-cache": (lambda L: L.prefill(with_slots(L, range(10**7, 10**7 + 20))), "slots"),
    "too-few-slots": (lambda L: L.prefill(with_slots(L, [400, 401])), "slots"),
    "live-batch-id": (lambda L: L.prefill(L.ok_request(), batch_id=L.a.id), "batch.id"),
    "live-request-id": (lambda L: L.prefill(L.request(EmuRequest("w20", max_new_tokens=2), rid=L.a_request.id)), ".id"),
    "duplicate-request-ids": (lambda L: L.prefill(L.request(EmuRequest("w20", max_new_tokens=2), rid=7),
                                                 L.request(EmuRequest("w21", max_new_tokens=2), rid=7)), ".id"),
    "slots-of-live-request": (lambda L: L.prefill(with_slots(L, list(L.a_request.slots)[:12])), "slots"),
    "slot-listed-twice": (lambda L: L.prefill(with_slots(L, [400] * 12)), "slots"),
    "two-new-requests-share-slots": (lambda L: L.prefill(with_slots(L, range(400, 412)), with_slots(L, range(405, 417))), "slots"),
    "empty-batch": (lambda L: L.prefill(), "batch.requests"),
    "filter-unknown-id": (lambda L: L.emu.stub.FilterBatch(pb2.FilterBatchRequest(batch_id=L.a.id, request_ids=[L.a_request.id, 99])), "request_ids"),
    "filter-duplicate-ids": (lambda L: L.emu.stub.FilterBatch(pb2.FilterBatchRequest(batch_id=L.a.id, request_ids=[L.a_request.id] * 2)), "request_ids"),
    "filter-no-ids": (lambda L: L.emu.stub.FilterBatch(pb2.FilterBatchRequest(batch_id=L.a.id)), "request_ids"),
    "warmup-empty-batch": (lambda L: L.emu.stub.Warmup(pb2.WarmupRequest(batch=pb2.Batch(id=next(ids)), max_input_tokens=64,
                                                                          max_total_tokens=128, max_prefill_tokens=256)), "batch.requests"),
    "decode-batch-twice": (lambda L: L.emu.stub.Decode(pb2.DecodeRequest(batches=[L.a, L.a])), "batches"),
    "decode-no-batches": (lambda L: L.emu.stub.Decode(pb2.DecodeRequest()), "batches"),
}


def with_zero_max_new(live: Live):
    r = live.ok_request()
    r.stopping_parameters.max_new_tokens = 0
    return r


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_rpc_is_invalid_argument_and_leaves_live_batch_alone(shard, reference, name):
    call, field = CASES[name]
    live = Live(shard)
    cached_before = {i: list(b.request_ids) for i, b in ((i, shard.shard.cache[i].to_pb(pb2)) for i in shard.shard.cache)}
    with pytest.raises(grpc.RpcError) as info:
        call(live)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert field in info.value.details(), info.value.details()
    assert {i: list(b.to_pb(pb2).request_ids) for i, b in shard.shard.cache.items()} == cached_before
    assert live.finish_a() == reference  # A's KV was not touched, nor was A dropped
    (ok,) = live.emu.run([EmuRequest("w30 w31", max_new_tokens=3)])  # and normal service goes on
    assert ok.error is None and len(ok.token_ids) == 3
    live.emu.stub.ClearCache(pb2.ClearCacheRequest())
    live.emu.close()


def test_unknown_batches_are_not_found(shard):
    live = Live(shard)
    for call in (lambda: live.emu.stub.FilterBatch(pb2.FilterBatchRequest(batch_id=424242, request_ids=[1])),
                 lambda: live.emu.stub.Decode(pb2.DecodeRequest(batches=[pb2.CachedBatch(id=424242)]))):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "424242" in info.value.details()
    live.emu.stub.ClearCache(pb2.ClearCacheRequest())
    live.emu.close()


def test_filter_with_known_ids_still_works(shard, reference):
    live = Live(shard)
    other = live.ok_request()
    response = live.prefill(other)
    both = live.emu.stub.Decode(pb2.DecodeRequest(batches=[live.a, response.batch]))
    live.tokens += [t for g in both.generations if g.request_id == live.a_request.id for t in g.tokens.ids]
    live.a = live.emu.stub.FilterBatch(pb2.FilterBatchRequest(batch_id=both.batch.id, request_ids=[live.a_request.id])).batch
    assert list(live.a.request_ids) == [live.a_request.id]
    assert live.finish_a() == reference
    live.emu.close()


def test_at_least_forty_kinds_with_the_http_suite():
    from tests.test_hostile_http import CASES as HTTP_CASES

    assert len(CASES) >= 30 and len(CASES) + len(HTTP_CASES) >= 40
