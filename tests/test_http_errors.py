"""Bad input over HTTP: a 4xx with TGI's error body, and the server keeps serving."""

from __future__ import annotations

import warnings

import httpx
import pytest

from tests.http_server import ServerProcess, metric, with_chat_template

LIMITS = ["--payload-limit", "4096", "--max-stop-sequences", "2"]
ENV = {"MAX_INPUT_TOKENS": "16", "MAX_TOTAL_TOKENS": "32", "SPECULATE_MODE": "none"}  # TGI's variable names
GEN = "/generate"
OK = {"inputs": "w5 w6", "parameters": {"max_new_tokens": 4}}


@pytest.fixture(scope="module")
def server(llama_dir, tmp_path_factory):
    model = with_chat_template(llama_dir, tmp_path_factory.mktemp("chat-llama"))
    proc = ServerProcess(model, tmp_path_factory.mktemp("logs") / "server.log", *LIMITS, env=ENV)
    try:
        yield proc.wait_healthy()
    finally:
        proc.stop()


def params(**kw) -> dict:
    return {"inputs": "w5 w6", "parameters": {"max_new_tokens": 4, **kw}}


LONG = " ".join(["w7"] * 20)
CASES = [
    # (route, body (dict, or raw bytes), status, error_type, substring of `error`)
    (GEN, b'{"inputs": "w5", "parameters": {', 400, "validation", "JSON"),
    (GEN, b"not json at all", 400, "validation", "JSON"),
    (GEN, {"parameters": {}}, 422, "validation", "inputs"),
    (GEN, {"inputs": 5}, 422, "validation", "inputs"),
    (GEN, params(max_new_tokens="4"), 422, "validation", "parameters.max_new_tokens"),
    (GEN, params(max_new_tokens=-1), 422, "validation", "parameters.max_new_tokens"),
    (GEN, params(do_sample="yes"), 422, "validation", "parameters.do_sample"),
    (GEN, {"inputs": "", "parameters": {"max_new_tokens": 4}}, 422, "validation", "`inputs` cannot be empty"),
    (GEN, {"inputs": LONG, "parameters": {"max_new_tokens": 4}}, 422, "validation", "`inputs` must have less than 16 tokens. Given: 20"),
    (GEN, params(max_new_tokens=31), 422, "validation", "`inputs` tokens + `max_new_tokens` must be <= 32. Given: 2 `inputs` tokens and 31 `max_new_tokens`"),
    (GEN, params(max_new_tokens=0), 422, "validation", "`max_new_tokens` must be strictly positive"),
    (GEN, params(temperature=0), 422, "validation", "`temperature` must be strictly positive"),
    (GEN, params(top_p=1.0), 422, "validation", "`top_p` must be > 0.0 and < 1.0"),
    (GEN, params(top_k=0), 422, "validation", "`top_k` must be strictly positive"),
    (GEN, params(typical_p=1.5), 422, "validation", "`typical_p` must be > 0.0 and < 1.0"),
    (GEN, params(repetition_penalty=0), 422, "validation", "`repetition_penalty` must be strictly positive"),
    (GEN, params(frequency_penalty=3), 422, "validation", "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    (GEN, params(stop=["a", "b", "c"]), 422, "validation", "`stop` supports up to 2 stop sequences. Given: 3"),
    (GEN, params(top_n_tokens=9), 422, "validation", "`top_n_tokens` must be >= 0 and <= 5. Given: 9"),
    (GEN, params(best_of=3, do_sample=True), 422, "validation", "`best_of` must be > 0 and <= 2. Given: 3"),
    (GEN, params(best_of=2), 422, "validation", "you must use sampling when `best_of` is > 1"),
    (GEN, params(truncate=0), 422, "validation", "`truncate` must be strictly positive"),
    (GEN, params(grammar={"type": "json", "value": {}}), 422, "validation", "grammar is not supported"),
    ("/generate_stream", params(best_of=2, do_sample=True), 422, "validation", "not supported when streaming"),
    ("/generate_stream", params(decoder_input_details=True), 422, "validation", "`decoder_input_details` == true"),
    ("/generate_stream", params(max_new_tokens=0), 422, "validation", "`max_new_tokens` must be strictly positive"),
    (GEN, {"inputs": "w5 " * 3000}, 413, "payload_too_large", "payload limit of 4096 bytes"),
    ("/v1/completions", {"prompt": "w5", "suffix": "w6"}, 422, "suffix not supported", "Suffix is not supported"),
    ("/v1/completions", {"prompt": ["w5"] * 5, "max_tokens": 2}, 422, "batch size exceeded", "maximum allowed batch size of 4"),
    ("/v1/completions", {"prompt": [], "max_tokens": 2}, 422, "validation", "Empty array"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "w5"}], "tools": [{}]}, 422, "validation", "`tools`"),
    ("/v1/chat/completions", {"messages": "w5"}, 422, "validation", "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}], "max_tokens": 2, "top_p": 1.0}, 422, "validation", "`top_p`"),
]


@pytest.mark.parametrize("route,body,status,error_type,message", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_request(server, route, body, status, error_type, message):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + route, timeout=30, **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error_type"] == error_type
    assert message in r.json()["error"]


def test_environment_variables_read(server):
    info = httpx.get(server.url + "/info").json()
    assert (info["max_input_tokens"], info["max_total_tokens"], info["speculate_mode"]) == (16, 32, "none")
    assert info["max_stop_sequences"] == 2


def test_still_serving_and_counted(server):
    for route in (GEN, "/generate_stream"):
        assert httpx.post(server.url + route, json=OK, timeout=30).status_code == 200
    text = httpx.get(server.url + "/metrics").text
    assert metric(text, "tgi_request_failure", 'err="validation"') >= 15


def test_health_503_shape_and_unknown_route(server):
    assert httpx.get(server.url + "/nope").status_code == 404
    assert httpx.post(server.url + "/health").status_code == 405


def test_clients_raise_on_errors(server):
    import openai
    import text_generation
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import ValidationError as HubValidationError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(text_generation.errors.ValidationError):
            text_generation.Client(server.url).generate("w5", max_new_tokens=100)
        with pytest.raises((HubValidationError, Exception)) as err:
            InferenceClient(base_url=server.url).text_generation("w5", max_new_tokens=100)
        assert "max_new_tokens" in str(err.value)
        with pytest.raises(openai.UnprocessableEntityError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="-").chat.completions.create(
                model="gpt-9", messages=[{"role": "user", "content": "w5"}], max_tokens=2,
                tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
        with pytest.raises(openai.UnprocessableEntityError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="-").completions.create(model="tgi", prompt="w5", max_tokens=100)
