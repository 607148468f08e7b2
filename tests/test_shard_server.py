"""The shard through the router emulation: TGI's call sequence, SPACE output equal to plain decoding."""

from __future__ import annotations

import json
import math
import shutil

import grpc
import pytest
import torch

from tests.router_emulation import TGI_ADMISSION, EmuRequest, InProcessShard, RouterPanic, pb2
from tgi_space.config import SpacePolicy, default_attention_backend
from tgi_space.engine import Engine
from tgi_space.llm import LLM
from tgi_space.sampling import SamplingParams
from tgi_space.server.batch import SpaceBatch
from tgi_space.server.options import ServeOptions
from tgi_space.watermark import Watermark

K = 3
FINISH = {"length": pb2.FINISH_REASON_LENGTH, "eos_token": pb2.FINISH_REASON_EOS_TOKEN,
          "stop_sequence": pb2.FINISH_REASON_STOP_SEQUENCE}


def words(start: int, n: int) -> str:
    return " ".join(f"w{4 + (start + j) % 90}" for j in range(n))


def options(model_dir, socket_base, mode: str = "space", chunking: bool = False,
            prefix_caching: bool = False) -> ServeOptions:
    """The paper's fixed layout (oracle candidates below); the planned step is tested in integration-tests.
    Without chunking or prefix caching (TGI's protocol before them) unless asked: test_shard_chunking.py and
    test_shard_prefix_caching.py have them."""
    return ServeOptions(model_dir=str(model_dir), uds_path=str(socket_base), block_size=4, kv_cache_bytes=2**20,
                        dtype="float32", k=K, speculate_mode=mode, planner=False, prefill_chunking=chunking,
                        prefix_caching=prefix_caching)


@pytest.fixture(scope="module")
def shard(llama_dir, tmp_path_factory):
    server = InProcessShard(options(llama_dir, tmp_path_factory.mktemp("sock") / "tgi"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def plain_shard(llama_dir, tmp_path_factory):
    server = InProcessShard(options(llama_dir, tmp_path_factory.mktemp("sock") / "tgi", mode="none"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(str(llama_dir), dtype="float32", kv_cache_bytes=2**22, block_size=4, space=SpacePolicy(k_max=K))


def offline(llm, emu, requests, extra=None):
    """Plain autoregressive outputs of the offline engine for the same prompt ids and parameters."""
    params = []
    for r in requests:
        p = dict(repetition_penalty=r.parameters.get("repetition_penalty", 1.0),
                 frequency_penalty=r.parameters.get("frequency_penalty", 0.0))
        if r.parameters.get("watermark"):
            p["watermark"] = Watermark()
        params.append(SamplingParams(max_new_tokens=r.max_new_tokens, stop=list(r.stop_sequences),
                                     ignore_eos=r.ignore_eos, top_n_tokens=r.top_n_tokens, **p))
    return llm.generate([emu.prompt_ids(r) for r in requests], params, speculate="none")


def mixed_requests() -> list[EmuRequest]:
    """16 requests: mixed lengths, arrival ticks, penalties, stop strings, tiny max_new_tokens."""
    requests = []
    for i in range(16):
        r = EmuRequest(words(7 * i, 3 + (i * 7) % 29), max_new_tokens=8 + (i * 5) % 20, arrival=2 * (i // 3))
        if i % 4 == 1:
            r.parameters = {"repetition_penalty": 1.3, "frequency_penalty": 0.5}
        elif i % 4 == 2:
            r.stop_sequences = ["w8"]
        elif i % 4 == 3:
            r.max_new_tokens = 1 + i % 3
        requests.append(r)
    return requests


def assert_same(results, reference):
    for i, (res, ref) in enumerate(zip(results, reference)):
        assert res.error is None, (i, res.error)
        assert res.token_ids == ref.token_ids, i
        assert res.generated_text.finish_reason == FINISH[ref.finish_reason], i
        assert res.generated_text.generated_tokens == len(ref.token_ids)


def test_router_start_up_sequence_and_info(shard):
    emu = shard.router()
    info = emu.info
    assert (info.speculate, info.block_size, info.requires_padding) == (K, 4, False)
    assert (info.support_chunking, info.use_prefix_caching, info.HasField("window_size")) == (False, False, False)
    assert (info.dtype, info.device_type, info.attention_impl) == ("torch.float32", "cpu", default_attention_backend("cpu"))
    assert info.attention_impl in ("fused", "matmul")
    assert emu.warmup.max_supported_total_tokens == 2**20 // 512  # 512 bytes of KV per token
    urls = emu.stub.ServiceDiscovery(pb2.ServiceDiscoveryRequest()).urls
    assert list(urls) == [f"unix://{shard.options.uds_path}-0"]
    assert emu.calls == ["ServiceDiscovery", "ClearCache", "Info", "Warmup"]
    assert shard.shard.cache == {}  # warm-up keeps nothing
    emu.close()


def test_greedy_space_equals_offline_plain_decoding(shard, plain_shard, llm):
    requests = mixed_requests()
    emu = shard.router()
    results = emu.run(requests)
    assert_same(results, offline(llm, emu, requests))
    assert "Decode" in emu.calls and emu.calls.count("Prefill") > 2  # continuous batching happened
    plain = plain_shard.router()
    assert plain.info.speculate == 0
    plain_results = plain.run(requests)
    assert [r.token_ids for r in plain_results] == [r.token_ids for r in results]
    assert [r.texts for r in plain_results] == [r.texts for r in results]
    assert any(r.generated_text.finish_reason == pb2.FINISH_REASON_STOP_SEQUENCE for r in results)
    for r, res in zip(requests, results):  # a stop string is at the end of the text
        if res.generated_text.finish_reason == pb2.FINISH_REASON_STOP_SEQUENCE:
            assert res.generated_text.text.endswith(r.stop_sequences[0])
    assert shard.shard.cache == {} and plain_shard.shard.cache == {}  # no per-request state left
    assert shard.shard.engine.last_step is None  # nor hidden states kept for prefill logprobs
    emu.close()
    plain.close()


def scrape(port: int) -> str:
    import urllib.request  # noqa: PLC0415

    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def test_metrics_port_exports_the_decode_steps(shard, plain_shard):
    """TGI_SPACE_METRICS_PORT: the shard's decode totals, counted independently here: one Decode call is one
    decode step; each request's first token comes from its Prefill, the rest from decode steps; plain decoding
    sends one row per sequence, the fixed layout 1 + k(k + 2) at most (fewer near max_new_tokens)."""
    from tests.http_server import free_port, metric  # noqa: PLC0415
    from tgi_space.server.service import serve_metrics  # noqa: PLC0415

    requests = [EmuRequest(words(5 * i, 4 + i), max_new_tokens=6 + 3 * i, ignore_eos=True) for i in range(4)]
    for server, rows_per_seq in ((plain_shard, 1), (shard, 1 + K * (K + 2))):
        port = free_port()
        serve_metrics(server.shard.engine, "127.0.0.1", port)
        names = ("steps", "sequences", "rows", "tokens")
        before = {n: metric(scrape(port), f"tgi_space_decode_{n}_total") for n in names}
        emu = server.router()
        results = emu.run(requests)
        text = scrape(port)
        got = {n: metric(text, f"tgi_space_decode_{n}_total") - before[n] for n in names}
        assert got["steps"] == emu.calls.count("Decode") > 0
        assert got["tokens"] == sum(len(r.token_ids) for r in results) - len(requests)
        if rows_per_seq == 1:
            assert got["rows"] == got["sequences"] == got["tokens"]
        else:
            assert got["sequences"] < got["rows"] <= rows_per_seq * got["sequences"]
            assert "tgi_space_drafter_drafted_total" in text  # declared even when the fixed layout drafts no tree
        emu.close()


def oracle_drafts(monkeypatch, truth: dict[tuple, list[int]]):
    """Candidates = the true continuation, so every candidate is accepted."""
    original = Engine._draft_next

    def drafted(self, seq, plan, groups, accepted):
        original(self, seq, plan, groups, accepted)
        if seq.candidates:
            ref = truth[tuple(seq.tokens[: seq.num_prompt])]
            start = len(seq.output_ids)
            cands = ref[start : start + len(seq.candidates)]
            seq.candidates = cands + [5] * (len(seq.candidates) - len(cands))

    monkeypatch.setattr(Engine, "_draft_next", drafted)


def oracle_requests() -> list[EmuRequest]:
    requests = [EmuRequest(words(11 * i, 4 + 5 * i), max_new_tokens=14 + 3 * i, arrival=2 * i) for i in range(6)]
    requests[2].cancel_after = 5  # the client goes away: FilterBatch keeps the others
    return requests


def run_with_oracle(shard, llm, monkeypatch):
    requests = oracle_requests()
    emu = shard.router()
    reference = offline(llm, emu, requests)
    oracle_drafts(monkeypatch, {tuple(emu.prompt_ids(r)): o.token_ids for r, o in zip(requests, reference)})
    results = emu.run(requests)
    emu.close()
    assert "FilterBatch" in emu.calls and emu.calls.count("Prefill") == len(requests), " ".join(emu.calls)
    for i, (res, ref) in enumerate(zip(results, reference)):
        if requests[i].cancel_after:
            assert res.cancelled and res.token_ids == ref.token_ids[: len(res.token_ids)]
        else:
            assert res.token_ids == ref.token_ids, i
    return results


def admissions(calls: list[str]) -> list[int]:
    """For each Prefill, how many Decode calls came before it."""
    decodes, out = 0, []
    for name in calls:
        decodes += name == "Decode"
        if name == "Prefill":
            out.append(decodes)
    return out


@pytest.mark.parametrize(("late", "expected"), [
    (1, [0, 19]),  # 1 queued < floor(1.2 * 4) = 4: it waits until 20 steps since the last admission
    (5, [0, 1]),   # 5 queued >= 4: they join at the first step after they arrive (tick 2)
])
def test_admission_follows_tgi_backpressure(plain_shard, late, expected):
    """TGI's batching_task with the launcher's defaults (waiting_served_ratio 1.2, max_waiting_tokens 20):
    four running requests; `late` more arrive at tick 2."""
    emu = plain_shard.router(**TGI_ADMISSION)
    requests = [EmuRequest(words(3 * i, 5), max_new_tokens=40, ignore_eos=True) for i in range(4)]
    requests += [EmuRequest(words(50 + i, 4), max_new_tokens=4, ignore_eos=True, arrival=2) for i in range(late)]
    results = emu.run(requests)
    emu.close()
    assert admissions(emu.calls[4:]) == expected, " ".join(emu.calls[4:])
    assert [len(r.token_ids) for r in results] == [r.max_new_tokens for r in requests]


def test_closed_loop_clients_keep_at_most_that_many_in_flight(plain_shard):
    emu = plain_shard.router()
    requests = [EmuRequest(words(7 * i, 3 + i), max_new_tokens=3 + 2 * i, ignore_eos=True) for i in range(6)]
    in_flight = []
    results = emu.run(requests, on_tick=lambda tick: in_flight.append(len(emu.entries)), clients=2)
    emu.close()
    assert max(in_flight) == 2  # never 3, though all six could be queued at tick 0
    assert [len(r.token_ids) for r in results] == [r.max_new_tokens for r in requests]


def test_prefill_batches_keep_to_the_prefill_token_budget(plain_shard):
    """TGI's queue adds requests to a prefill while their prompt tokens fit max_prefill_tokens (in whole blocks)."""
    emu = plain_shard.router()
    requests = [EmuRequest(words(5 * i, 9), max_new_tokens=3, ignore_eos=True) for i in range(5)]
    lengths = {len(emu.prompt_ids(r)) for r in requests}
    assert len(lengths) == 1 and lengths.pop() % 4 == 1  # block size 4: the budget below rounds up to 2 prompts
    emu.max_prefill_tokens = 2 * len(emu.prompt_ids(requests[0])) + 1
    sizes, call = [], emu._call

    def counting(name, request):
        if name == "Prefill":
            sizes.append(len(request.batch.requests))
        return call(name, request)

    emu._call = counting
    results = emu.run(requests)
    emu.close()
    assert sizes == [2, 2, 1]
    assert [len(r.token_ids) for r in results] == [3] * 5


def test_filter_and_concatenate_carry_candidates(shard, llm, monkeypatch):
    results = run_with_oracle(shard, llm, monkeypatch)
    for res in results:  # prefill: 1 token; every Decode: all k candidates accepted + 1, until the end
        assert res.tokens_per_generation[0] == 1
        assert all(n == K + 1 for n in res.tokens_per_generation[1:-1]), res.tokens_per_generation
    assert shard.shard.cache == {}


def test_dropping_candidates_in_concatenate_is_detected(shard, llm, monkeypatch):
    """The check above has teeth: a concatenate that loses SPACE state breaks it (not the output)."""
    original = SpaceBatch.concatenate.__func__

    def lossy(cls, batches):
        for b in batches[1:]:
            for r in b.requests:
                r.seq.candidates, r.seq.draft_probs = [], None
        return original(cls, batches)

    monkeypatch.setattr(SpaceBatch, "concatenate", classmethod(lossy))
    results = run_with_oracle(shard, llm, monkeypatch)
    assert any(n == 1 for res in results for n in res.tokens_per_generation[1:-1])


@pytest.fixture(scope="module")
def eos_dir(llama_dir, llm, tmp_path_factory):
    """The same model with a frequent word as an extra EOS id (config.json eos_token_id list)."""
    folder = tmp_path_factory.mktemp("eos")
    for f in llama_dir.iterdir():
        shutil.copy(f, folder / f.name)
    out = llm.generate([[4, 9, 13, 20]], SamplingParams(max_new_tokens=12), speculate="none")[0].token_ids
    cfg = json.loads((folder / "config.json").read_text())
    cfg["eos_token_id"] = [2, out[4]]
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, out


def test_eos_ignore_eos_and_length_before_eos(eos_dir, tmp_path_factory):
    folder, out = eos_dir
    eos, first = out[4], out.index(out[4])
    server = InProcessShard(options(folder, tmp_path_factory.mktemp("sock") / "tgi"))
    prompt = "w4 w9 w13 w20"
    try:
        emu = server.router()
        res = emu.run([
            EmuRequest(prompt, max_new_tokens=12),
            EmuRequest(prompt, max_new_tokens=12, ignore_eos=True),
            EmuRequest(prompt, max_new_tokens=first + 1),  # the EOS token is also the last allowed one
        ])
        emu.close()
    finally:
        server.stop()
    assert res[0].token_ids == out[: first + 1] and res[0].token_ids[-1] == eos
    assert res[0].generated_text.finish_reason == pb2.FINISH_REASON_EOS_TOKEN
    assert res[1].token_ids == out and res[1].generated_text.finish_reason == pb2.FINISH_REASON_LENGTH
    assert res[2].token_ids == out[: first + 1]
    assert res[2].generated_text.finish_reason == pb2.FINISH_REASON_LENGTH  # TGI: LENGTH wins over EOS


def test_bad_requests_are_refused_and_the_server_keeps_serving(shard, llm, monkeypatch):
    emu = shard.router()
    ok = EmuRequest(words(3, 6), max_new_tokens=6)
    bad = [  # one per tick, so each is a batch of its own (a bad request fails its whole batch)
        (EmuRequest(words(1, 5), arrival=1, parameters={"grammar": "[0-9]+", "grammar_type": 2}),
         "parameters.grammar"),
        (EmuRequest(words(2, 40), max_new_tokens=250, arrival=2), "max_new_tokens"),  # 40 + 250 > 256
        (EmuRequest(words(2, 4), arrival=3, parameters={"top_p": 1.5}), "top_p"),
    ]
    results = emu.run([ok] + [r for r, _ in bad] + [EmuRequest(words(5, 7), max_new_tokens=5, arrival=4)])
    for res, (_, field) in zip(results[1:], bad):
        assert res.error.startswith("INVALID_ARGUMENT") and field in res.error, res.error
    reference = offline(llm, emu, [ok, EmuRequest(words(5, 7), max_new_tokens=5)])
    assert [results[0].token_ids, results[-1].token_ids] == [r.token_ids for r in reference]

    def rpc_error(call, request):
        with pytest.raises(grpc.RpcError) as info:
            call(request)
        return info.value.code(), info.value.details()

    request = emu.request_pb(7, ok, [1], [4, 5, 6])  # 6 prompt tokens + 6 new - 1 positions need 11 slots
    code, details = rpc_error(emu.stub.Prefill, pb2.PrefillRequest(batch=pb2.Batch(id=7, requests=[request])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "slots" in details
    monkeypatch.setattr("tgi_space.server.batch.tokenize", lambda *a: [4, 5, 500])  # an id past the vocabulary
    request = emu.request_pb(8, ok, [1, 2, 3], list(range(4, 16)))
    code, details = rpc_error(emu.stub.Prefill, pb2.PrefillRequest(batch=pb2.Batch(id=8, requests=[request])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "token ids" in details
    monkeypatch.undo()
    request.adapter_id = "my-lora"
    code, details = rpc_error(emu.stub.Prefill, pb2.PrefillRequest(batch=pb2.Batch(id=9, requests=[request])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "adapter_id" in details
    code, details = rpc_error(emu.stub.Decode, pb2.DecodeRequest(batches=[pb2.CachedBatch(id=12345)]))
    assert code == grpc.StatusCode.NOT_FOUND and "12345" in details
    code, details = rpc_error(emu.stub.Decode, pb2.DecodeRequest())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert shard.shard.cache == {}
    again = emu.run([EmuRequest(words(5, 7), max_new_tokens=5)])  # still serving
    assert again[0].token_ids == reference[1].token_ids
    emu.stub.Health(pb2.HealthRequest())
    emu.close()


def test_health_probe_mid_run_leaves_live_requests_alone(shard, llm):
    emu = shard.router()
    requests = [EmuRequest(words(9 * i, 5 + 3 * i), max_new_tokens=12, arrival=i) for i in range(4)]
    probes = []
    results = emu.run(requests, on_tick=lambda t: probes.append(emu.health_probe()) if t in (2, 4) else None)
    assert_same(results, offline(llm, emu, requests))
    for probe in probes:
        (gen,) = probe.generations
        assert gen.request_id == 2**64 - 1 and len(gen.tokens.ids) == 1 and gen.HasField("generated_text")
        assert not probe.HasField("batch")
    assert 0 not in [b for e in emu.entries.values() for b in e.blocks]
    assert shard.shard.cache == {}
    emu.close()


def test_prefill_logprobs_top_tokens_and_logprobs(shard, llm, llama_dir):
    from transformers import AutoModelForCausalLM

    emu = shard.router()
    req = EmuRequest(words(20, 9), max_new_tokens=10, prefill_logprobs=True, top_n_tokens=3)
    (res,) = emu.run([req])
    emu.close()
    ids = emu.prompt_ids(req)
    pre = res.prefill_tokens
    assert list(pre.ids) == ids and math.isnan(pre.logprobs[0]) and list(pre.texts) == [f"w{i}" for i in ids]
    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
    expected = logp[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(list(pre.logprobs[1:])), expected, atol=1e-4, rtol=0)
    (ref,) = offline(llm, emu, [req])
    assert res.token_ids == ref.token_ids
    torch.testing.assert_close(torch.tensor(res.logprobs), torch.tensor([t.logprob for t in ref.tokens]),
                               atol=1e-4, rtol=0)
    assert res.top_tokens == [[i for i, _ in t.top] for t in ref.tokens]
    assert all(top[0] == tok for top, tok in zip(res.top_tokens, res.token_ids))
    plain = [t for t, special in zip(res.texts, res.is_special) if not special]
    assert "".join(plain) == res.generated_text.text  # special tokens are in texts, not in the text


def test_watermark_and_seeded_sampling(shard, llm):
    emu = shard.router()
    prompt = words(30, 6)
    requests = [
        EmuRequest(prompt, max_new_tokens=12, parameters={"watermark": True}),
        EmuRequest(prompt, max_new_tokens=12),
        EmuRequest(prompt, max_new_tokens=12, parameters={"do_sample": True, "seed": 42, "temperature": 0.8}),
        EmuRequest(prompt, max_new_tokens=12, parameters={"do_sample": True, "seed": 42, "temperature": 0.8},
                   arrival=2),
    ]
    results = emu.run(requests)
    emu.close()
    reference = offline(llm, emu, requests[:2])
    assert [r.token_ids for r in results[:2]] == [r.token_ids for r in reference]
    assert results[0].token_ids != results[1].token_ids  # the watermark did change something
    assert results[2].token_ids == results[3].token_ids  # a seed makes sampling reproducible
    assert results[2].generated_text.seed == 42 and not results[0].generated_text.HasField("seed")


def test_router_panics_are_detected(shard):
    """The emulation is strict: a Generation for an id the router does not know is a panic."""
    emu = shard.router()
    emu.entries.clear()
    request = emu.request_pb(3, EmuRequest(words(0, 3), max_new_tokens=4), [1, 2], list(range(4, 12)))
    batch = pb2.Batch(id=1, requests=[request])
    with pytest.raises(RouterPanic, match="ID not found"):
        emu._prefill(batch)
    emu.stub.ClearCache(pb2.ClearCacheRequest())
    assert shard.shard.cache == {}
    emu.close()


def test_internal_error_is_internal_and_only_fails_that_call(shard, llm, monkeypatch):
    emu = shard.router()
    original = type(shard.shard)._step
    calls = []

    def flaky(self, batch):
        calls.append(len(batch))
        if len(calls) == 2:  # the first Decode
            raise RuntimeError("simulated device failure")
        return original(self, batch)

    monkeypatch.setattr(type(shard.shard), "_step", flaky)
    (failed,) = emu.run([EmuRequest(words(40, 5), max_new_tokens=6)])
    assert failed.error == "INTERNAL: Decode: simulated device failure" and shard.shard.cache == {}
    monkeypatch.undo()
    request = EmuRequest(words(40, 5), max_new_tokens=6)
    (ok,) = emu.run([request])
    assert ok.token_ids == offline(llm, emu, [request])[0].token_ids
    emu.close()


def test_a_metrics_port_in_use_is_refused_naming_the_variable():
    import socket  # noqa: PLC0415

    from tgi_space.server.options import UnsupportedOption  # noqa: PLC0415
    from tgi_space.server.service import serve_metrics  # noqa: PLC0415

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UnsupportedOption, match=f"TGI_SPACE_METRICS_PORT={port}"):
            serve_metrics(None, "127.0.0.1", port)  # the engine is read only when scraped
