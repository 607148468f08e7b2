"""Hostile input over HTTP: every case is a 4xx in TGI's error shape naming the field, then a normal request works.

Issue 11, items 1, 3, 4, 10, 12, 17; the gRPC half is tests/test_hostile_grpc.py.
"""

from __future__ import annotations

import json
import math

import httpx
import pytest

from tests.http_server import with_chat_template
from tests.inprocess_server import InProcessServer

OK = {"inputs": "w5 w6", "parameters": {"max_new_tokens": 3}}
CHAT = [{"role": "user", "content": "w5 w6"}]


@pytest.fixture(scope="module")
def server(llama_dir, tmp_path_factory):
    model = with_chat_template(llama_dir, tmp_path_factory.mktemp("chat-llama"))
    srv = InProcessServer(model, max_top_n_tokens=5).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:  # one keep-alive connection for the whole suite
        yield c


def gen(**parameters) -> dict:
    return {"inputs": "w5 w6", "parameters": {"max_new_tokens": 3, **parameters}}


def raw_gen(parameters: str) -> bytes:
    """A /generate body with `parameters` spliced in verbatim (for what json.dumps cannot write)."""
    return ('{"inputs": "w5 w6", "parameters": {"max_new_tokens": 3, ' + parameters + "}}").encode()


def chat(**fields) -> dict:
    return {"model": "tgi", "messages": CHAT, "max_tokens": 3, **fields}


DEEP = b"[" * 100_000 + b"]" * 100_000
CASES = [
    # (name, route, body (dict, or raw bytes), expected status, what the error must name)
    ("temperature-tiny", "/generate", gen(temperature=1e-40), 422, "`temperature`"),
    ("temperature-tiny-sampling", "/generate", gen(temperature=1e-40, do_sample=True), 422, "`temperature`"),
    ("temperature-huge", "/generate", gen(temperature=1e30), 422, "`temperature`"),
    ("temperature-nan", "/generate", raw_gen('"temperature": NaN'), 400, "parameters.temperature"),
    ("temperature-inf", "/generate", raw_gen('"temperature": Infinity'), 400, "parameters.temperature"),
    ("temperature-neg-inf", "/generate", raw_gen('"temperature": -Infinity'), 400, "parameters.temperature"),
    ("temperature-overflow", "/generate", raw_gen('"temperature": 1e400'), 400, "parameters.temperature"),
    ("temperature-string", "/generate", gen(temperature="0.5"), 422, "parameters.temperature"),
    ("repetition-tiny-sampling", "/generate", gen(repetition_penalty=1e-40, do_sample=True), 422, "`repetition_penalty`"),
    ("repetition-tiny-greedy", "/generate", gen(repetition_penalty=1e-40), 422, "`repetition_penalty`"),
    ("repetition-huge", "/generate", gen(repetition_penalty=1e300), 422, "`repetition_penalty`"),
    ("repetition-nan", "/generate", raw_gen('"repetition_penalty": NaN'), 400, "parameters.repetition_penalty"),
    ("frequency-nan", "/generate", raw_gen('"frequency_penalty": NaN'), 400, "parameters.frequency_penalty"),
    ("top-p-nan", "/generate", raw_gen('"top_p": NaN'), 400, "parameters.top_p"),
    ("typical-p-inf", "/generate", raw_gen('"typical_p": Infinity'), 400, "parameters.typical_p"),
    ("max-new-tokens-u32", "/generate", gen(max_new_tokens=2**40), 422, "parameters.max_new_tokens"),
    ("seed-negative", "/generate", gen(seed=-1), 422, "parameters.seed"),
    ("seed-u64", "/generate", gen(seed=2**64), 422, "parameters.seed"),
    ("top-k-i32", "/generate", gen(top_k=2**31), 422, "parameters.top_k"),
    ("top-n-u32", "/generate", gen(top_n_tokens=2**32), 422, "parameters.top_n_tokens"),
    ("truncate-negative", "/generate", gen(truncate=-1), 422, "parameters.truncate"),
    ("best-of-zero", "/generate", gen(best_of=0, do_sample=True), 422, "`best_of`"),
    ("stop-not-list", "/generate", gen(stop="w5"), 422, "parameters.stop"),
    ("stop-int", "/generate", gen(stop=[1]), 422, "parameters.stop"),
    ("inputs-null", "/generate", {"inputs": None}, 422, "inputs"),
    ("inputs-list", "/generate", {"inputs": ["w5"]}, 422, "inputs"),
    ("parameters-list", "/generate", {"inputs": "w5", "parameters": [1]}, 422, "parameters"),
    ("inputs-lone-surrogate", "/generate", b'{"inputs": "abc\\ud800"}', 400, "inputs"),
    ("stop-lone-surrogate", "/generate", raw_gen('"stop": ["\\udfff"]'), 400, "parameters.stop[0]"),
    ("nested-100k", "/generate", DEEP, 400, "recursion limit"),
    ("nested-200", "/generate", b'{"inputs": ' + b"[" * 200 + b"]" * 200 + b"}", 400, "recursion limit"),
    ("body-empty", "/generate", b"", 400, "JSON"),
    ("body-array", "/generate", b"[]", 422, "body"),
    ("stream-temperature-tiny", "/generate_stream", gen(temperature=1e-40), 422, "`temperature`"),
    ("compat-repetition-tiny", "/", {**gen(repetition_penalty=1e-39, do_sample=True), "stream": True}, 422, "`repetition_penalty`"),
    ("tokenize-lone-surrogate", "/tokenize", b'{"inputs": "\\ud800x"}', 400, "inputs"),
    ("chat-temperature-tiny", "/v1/chat/completions", chat(temperature=1e-40), 422, "`temperature`"),
    ("chat-presence-nan", "/v1/chat/completions", json.dumps(chat(presence_penalty=math.nan)).encode(), 400, "presence_penalty"),
    ("chat-tools", "/v1/chat/completions", chat(tools=[{"type": "function", "function": {"name": "f"}}]), 422, "`tools`"),
    ("chat-response-format", "/v1/chat/completions", chat(response_format={"type": "json_object"}), 422, "`response_format`"),
    ("chat-top-logprobs", "/v1/chat/completions", chat(logprobs=True, top_logprobs=100), 422, "`top_n_tokens`"),
    ("chat-role-int", "/v1/chat/completions", {"messages": [{"role": 1, "content": "w5"}]}, 422, "messages.0.role"),
    ("chat-content-surrogate", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "messages[0].content"),
    ("completions-temperature-nan", "/v1/completions", b'{"prompt": "w5", "temperature": NaN}', 400, "temperature"),
    ("completions-repetition-tiny", "/v1/completions", {"prompt": "w5", "max_tokens": 2, "repetition_penalty": 1e-40}, 422, "`repetition_penalty`"),
    ("completions-prompt-surrogate", "/v1/completions", b'{"prompt": ["w5", "\\udc00"]}', 400, "prompt[1]"),
    ("completions-max-tokens-negative", "/v1/completions", {"prompt": "w5", "max_tokens": -5}, 422, "max_tokens"),
    ("completions-frequency-overflow", "/v1/completions", b'{"prompt": "w5", "frequency_penalty": -1e999}', 400, "frequency_penalty"),
]


@pytest.mark.parametrize("name,route,body,status,names", CASES, ids=[c[0] for c in CASES])
def test_hostile_request_is_a_clean_4xx_then_a_normal_request_works(client, name, route, body, status, names):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = client.post(route, **kwargs)
    assert r.status_code == status, r.text[:500]
    err = r.json()
    assert set(err) == {"error", "error_type"} and err["error_type"] == "validation", err
    assert names in err["error"], err["error"]
    assert r.headers.get("connection") != "close"  # a 4xx keeps the keep-alive connection
    ok = client.post("/generate", json=OK)
    assert ok.status_code == 200 and ok.json()["generated_text"] is not None, ok.text


def test_at_least_forty_kinds():
    assert len({c[0] for c in CASES}) >= 40


def test_unknown_route_and_wrong_method_in_tgi_error_shape(client):
    r = client.get("/no-such-route")
    assert r.status_code == 404 and set(r.json()) == {"error", "error_type"} and "/no-such-route" in r.json()["error"]
    r = client.put("/generate", json=OK)
    assert r.status_code == 405 and r.json()["error_type"] == "method_not_allowed" and "POST" in r.headers["allow"]


def test_any_openai_model_name_is_accepted_as_tgi_does(client, server):
    for route, body in (("/v1/chat/completions", chat(model="gpt-9")), ("/v1/completions", {"model": "x/y", "prompt": "w5", "max_tokens": 2})):
        r = client.post(route, json=body)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == server.state.model_id


def test_minus_infinity_logprobs_are_null_not_a_500(client):
    """top_k 1 leaves one finite logit, so every top-n alternative but the first has logprob -inf."""
    r = client.post("/generate", json=gen(top_k=1, top_n_tokens=5, details=True, seed=1))
    assert r.status_code == 200, r.text
    tops = r.json()["details"]["top_tokens"]
    assert tops and all(t[0]["logprob"] is not None and t[-1]["logprob"] is None for t in tops)
    r = client.post("/v1/chat/completions", json=chat(top_p=0.01, logprobs=True, top_logprobs=5, seed=1))
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert any(t["logprob"] is None for c in content for t in c["top_logprobs"])


def test_minus_infinity_logprobs_stream_as_null(client):
    body = chat(top_p=0.01, logprobs=True, top_logprobs=5, seed=1, stream=True)
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = [line[len("data:"):].strip() for line in r.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "[DONE]"
    events = [json.loads(line) for line in lines[:-1]]  # json.loads would accept -Infinity: check the text too
    assert not any("Infinity" in line or "NaN" in line for line in lines)
    tops = [t for e in events for c in e["choices"] if c["logprobs"] for x in c["logprobs"]["content"] for t in x["top_logprobs"]]
    assert tops and any(t["logprob"] is None for t in tops)
    with client.stream("POST", "/generate_stream", json=gen(top_k=1, top_n_tokens=5, seed=1)) as r:
        text = "".join(r.iter_text())
    assert "Infinity" not in text and '"logprob":null' in text


def test_openapi_has_request_and_response_schemas_at_tgis_path_too(client):
    doc = client.get("/openapi.json").json()
    assert client.get("/api-doc/openapi.json").json() == doc
    components = doc["components"]["schemas"]
    assert {"GenerateRequest", "GenerateParameters", "ChatRequest", "GenerateResponse", "ErrorResponse"} <= set(components)
    generate = doc["paths"]["/generate"]["post"]
    assert generate["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/GenerateRequest"}
    assert generate["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/GenerateResponse")
    assert generate["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "temperature" in components["GenerateParameters"]["properties"]
    refs = {v for v in _walk(doc) if isinstance(v, str) and v.startswith("#/components/schemas/")}
    assert {ref.rsplit("/", 1)[1] for ref in refs} <= set(components)  # every $ref resolves


def _walk(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)
    else:
        yield node
