"""The batch contract from protobuf fixtures, without gRPC: from_pb, filter, concatenate, to_pb."""

from __future__ import annotations

import pytest
import torch

from tgi_space.config import EngineConfig, SpacePolicy
from tgi_space.engine import Engine
from tgi_space.server.batch import BatchContext, Detokenizer, InvalidRequest, SpaceBatch, SlotTable
from tgi_space.server.generation import GeneratedText, Generation, Tokens
from tgi_space.server.protogen import load_pb
from tgi_space.server.shard import Shard
from tgi_space.watermark import Watermark

pb2, _ = load_pb()


@pytest.fixture(scope="module")
def engine(llama_dir):
    config = EngineConfig(model_dir=str(llama_dir), kv_cache_bytes=2**18, block_size=4, space=SpacePolicy(k_max=3, planner=False))
    return Engine(config)


@pytest.fixture
def ctx(engine):
    return BatchContext(engine, speculate=True, watermark=Watermark(0.25, 1.5))


def request(rid: int, text: str = "w5 w6 w7 w8", max_new: int = 6, slots_from: int = 16, **params):
    base = dict(temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0)
    base.update(params)
    num_slots = len(text.split()) + max_new - 1 + 3
    return pb2.Request(
        id=rid, inputs=text + "![](data:image/png;base64,AAAA)",
        input_chunks=pb2.Input(chunks=[pb2.InputChunk(text=text), pb2.InputChunk(image=pb2.Image(data=b"x"))]),
        truncate=64, add_special_tokens=True, parameters=pb2.NextTokenChooserParameters(**base),
        stopping_parameters=pb2.StoppingCriteriaParameters(max_new_tokens=max_new, stop_sequences=["w9"]),
        slots=list(range(slots_from, slots_from + num_slots)),
    )


def test_from_pb_reads_every_field(ctx):
    pb = request(7, temperature=0.5, top_k=4, top_p=0.9, typical_p=0.95, do_sample=True, seed=11,
                 repetition_penalty=1.2, frequency_penalty=0.3, watermark=True)
    pb.stopping_parameters.ignore_eos_token = True
    pb.top_n_tokens, pb.prefill_logprobs, pb.truncate = 2, True, 3
    batch = SpaceBatch.from_pb(pb2.Batch(id=4, requests=[pb], size=1), ctx)
    (r,) = batch.requests
    p = r.seq.params
    assert r.request_id == 7 and r.seq.tokens == [6, 7, 8]  # text chunk only, last `truncate` ids
    assert (p.temperature, p.top_k, p.do_sample, p.seed, p.ignore_eos, p.top_n_tokens) == (0.5, 4, True, 11, True, 2)
    assert (p.top_p, p.typical_p, p.repetition_penalty, p.frequency_penalty) == pytest.approx((0.9, 0.95, 1.2, 0.3))
    assert p.stop == ["w9"] and p.max_new_tokens == 6 and p.watermark == Watermark(0.25, 1.5)
    assert r.seed == 11 and r.seq.generator is not None and r.prefill_logprobs and r.seq.speculate
    assert r.slots.tolist() == list(pb.slots)


def test_greedy_request_has_no_seed_and_unset_ratios_mean_off(ctx):
    pb = request(1)
    pb.parameters.top_p = pb.parameters.typical_p = pb.parameters.repetition_penalty = 0.0  # proto3 "unset"
    (r,) = SpaceBatch.from_pb(pb2.Batch(id=0, requests=[pb]), ctx).requests
    assert r.seed is None and r.seq.generator is None and r.seq.params.is_greedy


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda r: setattr(r.parameters, "grammar", '{"type": "object"}'), "parameters.grammar"),
        (lambda r: setattr(r, "cache_len", 2), "cache_len"),
        (lambda r: setattr(r, "chunk_len", 2), "chunk_len"),
        (lambda r: setattr(r, "adapter_id", "lora"), "adapter_id"),
        (lambda r: r.ClearField("slots"), "slots"),
        (lambda r: r.slots.append(10**6), "slots"),
        (lambda r: setattr(r.stopping_parameters, "max_new_tokens", 0), "max_new_tokens"),
        (lambda r: setattr(r, "top_n_tokens", 50), "top_n_tokens"),
        (lambda r: setattr(r.stopping_parameters, "max_new_tokens", 300), "max_new_tokens"),
    ],
)
def test_bad_requests_name_the_field(ctx, mutate, field):
    good, bad = request(1), request(2)
    mutate(bad)
    with pytest.raises(InvalidRequest, match=field):
        SpaceBatch.from_pb(pb2.Batch(id=0, requests=[good, bad]), ctx)


def test_filter_and_concatenate_move_the_same_sequences(ctx):
    a = SpaceBatch.from_pb(pb2.Batch(id=3, requests=[request(i, slots_from=16 * i) for i in range(3)]), ctx)
    b = SpaceBatch.from_pb(pb2.Batch(id=9, requests=[request(5, slots_from=80)]), ctx)
    for r in a.requests + b.requests:
        r.seq.candidates = [r.request_id + 10] * 3  # SPACE state that must travel with its request
    seqs = {r.request_id: r.seq for r in a.requests + b.requests}
    kept = a.filter([2, 0, 99])
    assert kept.batch_id == 3 and [r.request_id for r in kept.requests] == [0, 2] and len(kept) == 2
    both = SpaceBatch.concatenate([kept, b])
    assert both.batch_id == 3 and [r.request_id for r in both.requests] == [0, 2, 5]
    assert all(r.seq is seqs[r.request_id] and r.seq.candidates == [r.request_id + 10] * 3 for r in both.requests)
    cached = pb2.CachedBatch.FromString(both.to_pb(pb2).SerializeToString())
    assert (cached.id, list(cached.request_ids), cached.size) == (3, [0, 2, 5], 3)
    assert cached.max_tokens == sum(r.slots.numel() for r in both.requests) and cached.current_tokens == 12


def test_slot_table_maps_positions_to_router_slots(ctx):
    batch = SpaceBatch.from_pb(pb2.Batch(id=0, requests=[request(0, slots_from=40)]), ctx)
    seq = batch.requests[0].seq
    table = SlotTable(batch.requests)
    assert table.slots(seq.seq_id, 2, 5).tolist() == [42, 43, 44]
    with pytest.raises(RuntimeError, match="no slot"):
        table.slots(seq.seq_id, 0, 100)


def test_generation_to_pb_round_trip():
    gen = Generation(
        request_id=2**64 - 1,
        tokens=Tokens([5, 6], [-0.5, -1.5], [" w5", " w6"], [False, False]),
        prefill_tokens=Tokens([4, 9], [float("nan"), -2.0], ["w4", "w9"], [False, False]),
        top_tokens=[Tokens([5], [-0.5], ["w5"], [False]), Tokens([6], [-1.5], ["w6"], [False])],
        generated_text=GeneratedText(" w5 w6", 2, "stop_sequence", None),
    )
    msg = pb2.Generation.FromString(gen.to_pb(pb2).SerializeToString())
    assert msg.request_id == 2**64 - 1 and list(msg.tokens.ids) == [5, 6] and len(msg.top_tokens) == 2
    assert msg.generated_text.finish_reason == pb2.FINISH_REASON_STOP_SEQUENCE
    assert not msg.generated_text.HasField("seed") and list(msg.prefill_tokens.ids) == [4, 9]
    seeded = GeneratedText("x", 1, "eos_token", 0).to_pb(pb2)
    assert seeded.HasField("seed") and seeded.finish_reason == pb2.FINISH_REASON_EOS_TOKEN
    bare = Generation(1, Tokens([3], [-1.0], ["a"], [False])).to_pb(pb2)
    assert not bare.HasField("generated_text") and not bare.HasField("prefill_tokens")


def test_detokenizer_adds_each_tokens_text(engine):
    ids = [4, 5, 6]
    detok = Detokenizer(engine.tokenizer, len(ids))
    texts = []
    for t in [7, 1, 8]:
        ids.append(t)
        texts.append(detok.next_text(ids))
    assert texts == [" w7", " <s>", " w8"]


def test_shard_warmup_and_prefill_without_grpc(engine, ctx):
    shard = Shard(engine, speculate=True, watermark=Watermark())
    filler = request(0, "w5 " * 20)
    filler.ClearField("slots")
    result = shard.warmup(pb2.Batch(id=0, requests=[filler, filler]), max_input=None, max_total=None)
    assert (result.max_total_tokens, result.max_input_tokens) == (40, 39) and shard.cache == {}
    assert result.max_supported_total_tokens == engine.num_slots  # scratch slots are not the router's
    step = shard.prefill(pb2.Batch(id=5, requests=[request(0), request(1, slots_from=40)]))
    assert step.batch is not None and set(shard.cache) == {5} and len(step.generations) == 2
    step = shard.decode([5])
    assert all(len(g.tokens) >= 1 for g in step.generations)
    shard.clear(None)
    assert shard.cache == {}


def test_watermark_uses_each_rows_true_previous_token():
    wm = Watermark(gamma=0.5, delta=2.0)
    logits = torch.zeros(3, 16)
    out = wm.apply(logits, history=[4, 7], extra=[9, 3])
    for row, previous in enumerate([7, 9, 3]):
        green = wm.green_list(previous, 16, torch.device("cpu"))
        assert green.numel() == 8 and torch.all(out[row, green] == 2.0)
        assert (out[row] == 0).sum() == 8
    assert not torch.equal(out[0], out[1])  # different previous tokens, different green lists
    with pytest.raises(ValueError, match="WATERMARK_GAMMA"):
        Watermark.from_env({"WATERMARK_GAMMA": "1.5"})
