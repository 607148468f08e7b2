"""The v3 protocol stubs: generation, wire layout the TGI router relies on, round trips."""

from __future__ import annotations

import importlib.util
import sys

import pytest

pytest.importorskip("grpc_tools")

from tgi_space.server import protogen  # noqa: E402

pb2, pb2_grpc = protogen.load_pb()

# What TGI v3.3.x (proto/v3/generate.proto) puts on the wire, per message:
# field -> (number, type, kind). kind: "" plain, "repeated", "optional"
# (proto3 explicit presence), "oneof:<name>". A renumbering or retyping fails here.
FIELDS: dict[str, dict[str, tuple[int, str, str]]] = {
    "HealthRequest": {},
    "HealthResponse": {},
    "InfoRequest": {},
    "InfoResponse": {
        "requires_padding": (1, "bool", ""),
        "dtype": (2, "string", ""),
        "device_type": (3, "string", ""),
        "window_size": (4, "uint32", "optional"),
        "speculate": (5, "uint32", ""),
        "support_chunking": (6, "bool", ""),
        "use_prefix_caching": (7, "bool", ""),
        "attention_impl": (8, "string", ""),
        "block_size": (9, "uint32", ""),
    },
    "ServiceDiscoveryRequest": {},
    "ServiceDiscoveryResponse": {"urls": (1, "string", "repeated")},
    "ClearCacheRequest": {"id": (1, "uint64", "optional")},
    "ClearCacheResponse": {},
    "Image": {"data": (1, "bytes", ""), "mimetype": (2, "string", "")},
    "InputChunk": {
        "text": (1, "string", "oneof:chunk"),
        "image": (2, "message:generate.v3.Image", "oneof:chunk"),
    },
    "Input": {"chunks": (1, "message:generate.v3.InputChunk", "repeated")},
    "NextTokenChooserParameters": {
        "temperature": (1, "float", ""),
        "top_k": (2, "uint32", ""),
        "top_p": (3, "float", ""),
        "typical_p": (4, "float", ""),
        "do_sample": (5, "bool", ""),
        "seed": (6, "uint64", ""),
        "repetition_penalty": (7, "float", ""),
        "watermark": (8, "bool", ""),
        "frequency_penalty": (9, "float", ""),
        "grammar": (10, "string", ""),
        "grammar_type": (11, "enum:generate.v3.GrammarType", ""),
    },
    "StoppingCriteriaParameters": {
        "max_new_tokens": (1, "uint32", ""),
        "stop_sequences": (2, "string", "repeated"),
        "ignore_eos_token": (3, "bool", ""),
    },
    "Request": {
        "id": (1, "uint64", ""),
        "inputs": (2, "string", ""),
        "truncate": (3, "uint32", ""),
        "parameters": (4, "message:generate.v3.NextTokenChooserParameters", ""),
        "stopping_parameters": (5, "message:generate.v3.StoppingCriteriaParameters", ""),
        "prefill_logprobs": (6, "bool", ""),
        "top_n_tokens": (7, "uint32", ""),
        "input_chunks": (8, "message:generate.v3.Input", ""),
        "blocks": (9, "uint32", "repeated"),
        "slots": (10, "uint32", "repeated"),
        "adapter_id": (11, "string", "optional"),
        "cache_len": (12, "uint32", ""),
        "add_special_tokens": (13, "bool", ""),
        "chunk_len": (14, "uint32", "optional"),
    },
    "Batch": {
        "id": (1, "uint64", ""),
        "requests": (2, "message:generate.v3.Request", "repeated"),
        "size": (3, "uint32", ""),
        "max_tokens": (4, "uint32", ""),
        "max_blocks": (5, "uint32", ""),
    },
    "CachedBatch": {
        "id": (1, "uint64", ""),
        "request_ids": (2, "uint64", "repeated"),
        "size": (3, "uint32", ""),
        "max_tokens": (4, "uint32", ""),
        "current_tokens": (5, "uint32", ""),
    },
    "GeneratedText": {
        "text": (1, "string", ""),
        "generated_tokens": (2, "uint32", ""),
        "finish_reason": (3, "enum:generate.v3.FinishReason", ""),
        "seed": (4, "uint64", "optional"),
    },
    "Tokens": {
        "ids": (1, "uint32", "repeated"),
        "logprobs": (2, "float", "repeated"),
        "texts": (3, "string", "repeated"),
        "is_special": (4, "bool", "repeated"),
    },
    "Generation": {
        "request_id": (1, "uint64", ""),
        "prefill_tokens": (2, "message:generate.v3.Tokens", ""),
        "tokens": (3, "message:generate.v3.Tokens", ""),
        "generated_text": (4, "message:generate.v3.GeneratedText", "optional"),
        "top_tokens": (5, "message:generate.v3.Tokens", "repeated"),
    },
    "FilterBatchRequest": {
        "batch_id": (1, "uint64", ""),
        "request_ids": (2, "uint64", "repeated"),
    },
    "FilterBatchResponse": {"batch": (1, "message:generate.v3.CachedBatch", "")},
    "PrefillRequest": {
        "batch": (1, "message:generate.v3.Batch", ""),
        "cached_batch": (2, "message:generate.v3.CachedBatch", ""),
    },
    "PrefillResponse": {
        "generations": (1, "message:generate.v3.Generation", "repeated"),
        "batch": (2, "message:generate.v3.CachedBatch", "optional"),
        "forward_ns": (3, "uint64", ""),
        "decode_ns": (4, "uint64", ""),
        "total_ns": (5, "uint64", ""),
        "concat_ns": (6, "uint64", "optional"),
    },
    "DecodeRequest": {"batches": (1, "message:generate.v3.CachedBatch", "repeated")},
    "DecodeResponse": {
        "generations": (1, "message:generate.v3.Generation", "repeated"),
        "batch": (2, "message:generate.v3.CachedBatch", "optional"),
        "forward_ns": (3, "uint64", ""),
        "decode_ns": (4, "uint64", ""),
        "total_ns": (5, "uint64", ""),
        "concat_ns": (6, "uint64", "optional"),
    },
    "WarmupRequest": {
        "batch": (1, "message:generate.v3.Batch", ""),
        "max_input_tokens": (2, "uint32", "optional"),
        "max_prefill_tokens": (3, "uint32", ""),
        "max_total_tokens": (4, "uint32", "optional"),
    },
    "WarmupResponse": {
        "max_supported_total_tokens": (1, "uint32", "optional"),
        "max_input_tokens": (2, "uint32", ""),
        "max_total_tokens": (3, "uint32", ""),
    },
}

ENUMS = {
    "GrammarType": {"GRAMMAR_TYPE_NONE": 0, "GRAMMAR_TYPE_JSON": 1, "GRAMMAR_TYPE_REGEX": 2},
    "FinishReason": {
        "FINISH_REASON_LENGTH": 0,
        "FINISH_REASON_EOS_TOKEN": 1,
        "FINISH_REASON_STOP_SEQUENCE": 2,
    },
}

# rpc -> (request message, response message), all unary-unary.
RPCS = {
    "Info": ("InfoRequest", "InfoResponse"),
    "ServiceDiscovery": ("ServiceDiscoveryRequest", "ServiceDiscoveryResponse"),
    "ClearCache": ("ClearCacheRequest", "ClearCacheResponse"),
    "FilterBatch": ("FilterBatchRequest", "FilterBatchResponse"),
    "Warmup": ("WarmupRequest", "WarmupResponse"),
    "Prefill": ("PrefillRequest", "PrefillResponse"),
    "Decode": ("DecodeRequest", "DecodeResponse"),
    "Health": ("HealthRequest", "HealthResponse"),
}

_SCALAR_NAMES = {
    "TYPE_BOOL": "bool",
    "TYPE_BYTES": "bytes",
    "TYPE_FLOAT": "float",
    "TYPE_STRING": "string",
    "TYPE_UINT32": "uint32",
    "TYPE_UINT64": "uint64",
}


def _describe(field) -> tuple[int, str, str]:
    """(number, type, kind) of a field descriptor, in the table's notation."""
    if field.type == field.TYPE_MESSAGE:
        type_name = f"message:{field.message_type.full_name}"
    elif field.type == field.TYPE_ENUM:
        type_name = f"enum:{field.enum_type.full_name}"
    else:
        names = {getattr(field, k): v for k, v in _SCALAR_NAMES.items()}
        type_name = names.get(field.type, f"other:{field.type}")
    oneof = field.containing_oneof
    if field.is_repeated:
        kind = "repeated"
    elif oneof is not None and oneof.name == f"_{field.name}":
        kind = "optional"  # proto3 `optional` is a synthetic one-field oneof
    elif oneof is not None:
        kind = f"oneof:{oneof.name}"
    else:
        kind = ""
    return field.number, type_name, kind


def test_package_and_generated_modules():
    assert pb2.DESCRIPTOR.package == "generate.v3"
    assert pb2.__name__ == "tgi_space.server.pb.generate_pb2"
    assert pb2_grpc.__name__ == "tgi_space.server.pb.generate_pb2_grpc"


def test_every_message_field_matches_tgi():
    assert set(pb2.DESCRIPTOR.message_types_by_name) == set(FIELDS)
    for message, expected in FIELDS.items():
        descriptor = pb2.DESCRIPTOR.message_types_by_name[message]
        actual = {f.name: _describe(f) for f in descriptor.fields}
        assert actual == expected, message


def test_enums_match_tgi():
    assert set(pb2.DESCRIPTOR.enum_types_by_name) == set(ENUMS)
    for enum, expected in ENUMS.items():
        values = pb2.DESCRIPTOR.enum_types_by_name[enum].values
        assert {v.name: v.number for v in values} == expected


def test_service_methods_match_tgi():
    service = pb2.DESCRIPTOR.services_by_name["TextGenerationService"]
    assert service.full_name == "generate.v3.TextGenerationService"
    actual = {m.name: (m.input_type.name, m.output_type.name) for m in service.methods}
    assert actual == RPCS
    for method in service.methods:
        assert not method.client_streaming and not method.server_streaming
    for name in ("TextGenerationServiceStub", "TextGenerationServiceServicer"):
        assert hasattr(pb2_grpc, name)
    assert callable(pb2_grpc.add_TextGenerationServiceServicer_to_server)


def test_wire_bytes_of_hand_encoded_messages():
    # Field numbers and wire types, checked against bytes written by hand.
    assert pb2.ClearCacheRequest(id=0).SerializeToString() == b"\x08\x00"  # presence kept
    assert pb2.ClearCacheRequest().SerializeToString() == b""
    params = pb2.NextTokenChooserParameters(watermark=True, frequency_penalty=1.0)
    # field 8 varint 1, then field 9 fixed32 1.0f (0x3f800000 little-endian)
    assert params.SerializeToString() == b"\x40\x01\x4d\x00\x00\x80\x3f"
    cached = pb2.CachedBatch(id=2**64 - 1, request_ids=[1, 2])
    assert cached.SerializeToString() == (
        b"\x08" + b"\xff" * 9 + b"\x01" + b"\x12\x02\x01\x02"  # packed uint64
    )
    request = pb2.Request(blocks=[0], slots=[0], chunk_len=0)
    assert request.SerializeToString() == b"\x4a\x01\x00\x52\x01\x00\x70\x00"


def _full_request(request_id: int) -> "pb2.Request":
    """A Request with every field set to a non-default value."""
    image = pb2.Image(data=b"\xff\xd8\xff", mimetype="image/jpeg;base64")
    return pb2.Request(
        id=request_id,
        inputs="_test _test ![](data:image/jpeg;base64,/9j/)",
        input_chunks=pb2.Input(
            chunks=[pb2.InputChunk(text="_test _test "), pb2.InputChunk(image=image)]
        ),
        truncate=2,
        parameters=pb2.NextTokenChooserParameters(
            temperature=0.9,
            top_k=10,
            top_p=0.9,
            typical_p=0.9,
            do_sample=True,
            seed=2**64 - 2,
            repetition_penalty=1.2,
            frequency_penalty=0.1,
            watermark=True,
            grammar='{"type": "object"}',
            grammar_type=pb2.GRAMMAR_TYPE_JSON,
        ),
        stopping_parameters=pb2.StoppingCriteriaParameters(
            max_new_tokens=17, stop_sequences=["\n\n", "###"], ignore_eos_token=True
        ),
        prefill_logprobs=True,
        top_n_tokens=20,
        blocks=[3, 4],
        slots=[48, 49, 50, 64],
        adapter_id="__base_model__",
        cache_len=16,
        add_special_tokens=True,
        chunk_len=5,
    )


def test_batch_round_trip_keeps_every_field():
    requests = [_full_request(0), _full_request(2**64 - 1)]
    batch = pb2.Batch(id=7, requests=requests, size=2, max_tokens=90, max_blocks=2)
    decoded = pb2.Batch.FromString(batch.SerializeToString())
    assert decoded == batch
    request = decoded.requests[1]
    assert request.id == 2**64 - 1
    assert request.parameters.seed == 2**64 - 2
    assert request.parameters.temperature == pytest.approx(0.9)
    assert request.parameters.top_p == pytest.approx(0.9)
    assert request.parameters.typical_p == pytest.approx(0.9)
    assert request.parameters.repetition_penalty == pytest.approx(1.2)
    assert request.parameters.frequency_penalty == pytest.approx(0.1)
    assert (request.parameters.top_k, request.parameters.do_sample) == (10, True)
    assert request.parameters.watermark is True
    assert request.parameters.grammar_type == pb2.GRAMMAR_TYPE_JSON
    assert list(request.stopping_parameters.stop_sequences) == ["\n\n", "###"]
    assert [c.WhichOneof("chunk") for c in request.input_chunks.chunks] == ["text", "image"]
    assert request.HasField("chunk_len") and request.chunk_len == 5
    assert request.HasField("adapter_id")
    assert list(request.slots) == [48, 49, 50, 64]


def test_optional_fields_keep_presence():
    # The router distinguishes unset from zero on these (Warmup limits, ClearCache id).
    unset = pb2.WarmupRequest(max_prefill_tokens=4096)
    empty = pb2.WarmupRequest.FromString(unset.SerializeToString())
    assert not empty.HasField("max_input_tokens") and not empty.HasField("max_total_tokens")
    zero = pb2.WarmupRequest.FromString(pb2.WarmupRequest(max_input_tokens=0).SerializeToString())
    assert zero.HasField("max_input_tokens")
    assert not pb2.Request.FromString(pb2.Request(id=1).SerializeToString()).HasField("chunk_len")
    response = pb2.DecodeResponse(generations=[pb2.Generation(request_id=1)])
    decoded = pb2.DecodeResponse.FromString(response.SerializeToString())
    assert not decoded.HasField("batch") and not decoded.HasField("concat_ns")
    assert not decoded.generations[0].HasField("generated_text")


def test_multi_token_generation_round_trip():
    tokens = pb2.Tokens(ids=[5, 6, 7], logprobs=[-0.1, -0.2, -0.3], texts=["a", "b", "</s>"],
                        is_special=[False, False, True])
    top_one = pb2.Tokens(ids=[5, 9], logprobs=[-0.1, -2.5], texts=["a", "z"],
                         is_special=[False, False])
    top = [top_one] * 3  # one entry per generated token
    generation = pb2.Generation(
        request_id=3,
        tokens=tokens,
        top_tokens=top,
        generated_text=pb2.GeneratedText(
            text="ab", generated_tokens=3, finish_reason=pb2.FINISH_REASON_EOS_TOKEN, seed=0
        ),
    )
    decoded = pb2.Generation.FromString(generation.SerializeToString())
    assert decoded == generation
    assert len(decoded.top_tokens) == len(decoded.tokens.ids)
    assert decoded.generated_text.HasField("seed")


def test_generate_into_fresh_directory(tmp_path):
    out = protogen.generate(pb_dir=tmp_path / "pb")
    assert protogen.is_fresh(pb_dir=out)
    grpc_text = (out / "generate_pb2_grpc.py").read_text()
    assert "from . import generate_pb2 as" in grpc_text
    assert "\nimport generate_pb2" not in grpc_text
    (out / protogen.STAMP_NAME).write_text("stale\n")
    assert not protogen.is_fresh(pb_dir=out)
    # The generated directory imports as a package under another name too.
    spec = importlib.util.spec_from_file_location("_pb_copy", out / "__init__.py",
                                                  submodule_search_locations=[str(out)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["_pb_copy"] = package
    try:
        spec.loader.exec_module(package)
        grpc_module = importlib.import_module("_pb_copy.generate_pb2_grpc")
        assert hasattr(grpc_module, "TextGenerationServiceStub")
    finally:
        for name in [n for n in sys.modules if n == "_pb_copy" or n.startswith("_pb_copy.")]:
            del sys.modules[name]


def test_load_pb_is_idempotent():
    assert protogen.is_fresh()
    again, again_grpc = protogen.load_pb()
    assert again is pb2 and again_grpc is pb2_grpc
