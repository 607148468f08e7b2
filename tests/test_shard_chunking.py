"""Prefill chunking (Info.support_chunking): TGI 3's router joins new requests to the running batch's next step
(Prefill with cached_batch) and cuts prompts over its prefill budget (chunk_len); the shard runs both in one
forward. Outputs must stay those of plain decoding; prompt log-probabilities those of the whole prompt."""

from __future__ import annotations

import math

import grpc
import pytest
import torch

from tests.router_emulation import TGI_ADMISSION, EmuRequest, InProcessShard, pb2
from tests.test_shard_server import K, assert_same, mixed_requests, offline, options, words
from tgi_space.config import SpacePolicy
from tgi_space.engine import Engine
from tgi_space.llm import LLM


@pytest.fixture(scope="module")
def shard(llama_dir, tmp_path_factory):
    server = InProcessShard(options(llama_dir, tmp_path_factory.mktemp("sock") / "tgi", chunking=True))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def planned_shard(llama_dir, tmp_path_factory):
    opts = options(llama_dir, tmp_path_factory.mktemp("sock") / "tgi", chunking=True)
    opts.planner = True
    server = InProcessShard(opts)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(str(llama_dir), dtype="float32", kv_cache_bytes=2**22, block_size=4, space=SpacePolicy(k_max=K))


class Spy:
    """Counts the RPCs with cached_batch and chunk_len, and the prefill chunks the engine ran."""

    def __init__(self, emu, monkeypatch) -> None:
        self.fused = self.cut = self.partial = 0
        call = emu._call

        def counting(name, request):
            if name == "Prefill":
                self.fused += request.HasField("cached_batch")
                self.cut += sum(r.HasField("chunk_len") for r in request.batch.requests)
            return call(name, request)

        emu._call = counting
        execute = Engine.execute

        def spying(engine, planned, *args, **kwargs):
            self.partial += sum(p.partial for _, p in planned)
            return execute(engine, planned, *args, **kwargs)

        monkeypatch.setattr(Engine, "execute", spying)


@pytest.mark.parametrize("name", ["shard", "planned_shard"])
@pytest.mark.parametrize("admission", [{}, TGI_ADMISSION])
def test_chunked_greedy_space_equals_offline_plain_decoding(request, name, admission, llm, monkeypatch):
    server = request.getfixturevalue(name)
    emu = server.router(max_prefill_tokens=24, **admission)  # prompts of 5-33 tokens: some are cut
    assert emu.info.support_chunking
    spy = Spy(emu, monkeypatch)
    requests = mixed_requests()
    results = emu.run(requests)
    emu.close()
    assert spy.fused > 0 and spy.cut > 0 and spy.partial >= spy.cut  # joined steps and cut prompts happened
    assert "Decode" in emu.calls
    assert_same(results, offline(llm, emu, requests))
    assert server.shard.cache == {} and server.shard.engine.last_step is None


def test_chunked_prompt_logprobs_are_the_whole_prompts(shard, llama_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    emu = shard.router(max_prefill_tokens=8)
    running = EmuRequest(words(3, 4), max_new_tokens=20, ignore_eos=True)
    req = EmuRequest(words(20, 21), max_new_tokens=4, prefill_logprobs=True, arrival=2)  # cut into 3+ chunks
    spy = Spy(emu, monkeypatch)
    res = emu.run([running, req])[1]
    emu.close()
    ids = emu.prompt_ids(req)
    assert spy.cut >= 1 and spy.partial >= 2
    pre = res.prefill_tokens
    assert list(pre.ids) == ids and math.isnan(pre.logprobs[0]) and len(pre.logprobs) == len(ids)
    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
    expected = logp[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(list(pre.logprobs[1:])), expected, atol=1e-4, rtol=0)


def test_a_refused_request_fails_its_joined_step_and_the_shard_keeps_serving(shard, llm):
    """The router fails every request of a Prefill that errors, so the shard drops the cached batch too
    (its slots go back to the router); nothing is left behind and the next requests are served."""
    emu = shard.router()
    ok = EmuRequest(words(3, 6), max_new_tokens=12, ignore_eos=True)
    bad = EmuRequest(words(1, 5), arrival=2, parameters={"grammar": "[0-9]+", "grammar_type": 2})
    results = emu.run([ok, bad])
    for res in results:
        assert res.error.startswith("INVALID_ARGUMENT") and "parameters.grammar" in res.error, res.error
    assert shard.shard.cache == {} and emu.entries == {}
    later = [EmuRequest(words(5, 7), max_new_tokens=5), EmuRequest(words(9, 4), max_new_tokens=6, arrival=1)]
    assert_same(emu.run(later), offline(llm, emu, later))
    emu.close()


def test_without_chunking_cached_batch_and_chunk_len_are_refused(llama_dir, tmp_path_factory):
    server = InProcessShard(options(llama_dir, tmp_path_factory.mktemp("sock") / "tgi"))
    try:
        emu = server.router()
        assert not emu.info.support_chunking
        req = EmuRequest(words(3, 6), max_new_tokens=4)
        first = emu.stub.Prefill(pb2.PrefillRequest(batch=emu._next_batch([(req, None)], 1)))
        second = emu._next_batch([(EmuRequest(words(8, 6), max_new_tokens=4), None)], 1)
        with pytest.raises(grpc.RpcError) as info:
            emu.stub.Prefill(pb2.PrefillRequest(batch=second, cached_batch=first.batch))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cached_batch" in info.value.details()
        assert list(server.shard.cache) == [first.batch.id]  # refused before anything changed
        second.requests[0].chunk_len = 2
        with pytest.raises(grpc.RpcError) as info:
            emu.stub.Prefill(pb2.PrefillRequest(batch=second))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "chunk_len" in info.value.details()
        emu.close()
    finally:
        server.stop()
