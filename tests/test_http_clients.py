"""Unmodified clients (huggingface_hub, openai, text-generation) against `tgi-space serve` in a subprocess."""

from __future__ import annotations

import warnings

import httpx
import pytest

from tests.http_server import ENGINE_ARGS, ServerProcess, metric, with_chat_template
from tgi_space.llm import LLM
from tgi_space.sampling import SamplingParams

PROMPTS = ["w5 w6 w7", "w10 w11 w12 w13 w14", "w40"]
N = 12


@pytest.fixture(scope="module")
def model_dir(llama_dir, tmp_path_factory):
    return with_chat_template(llama_dir, tmp_path_factory.mktemp("chat-llama"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    proc = ServerProcess(model_dir, tmp_path_factory.mktemp("logs") / "server.log")
    try:
        yield proc.wait_healthy()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def reference(model_dir):
    """Greedy token ids of the offline engine, by prompt text (SPACE on, as the server)."""
    llm = LLM(str(model_dir), **ENGINE_ARGS)

    def run(prompt: str, max_new_tokens: int = N, add_special_tokens: bool = True) -> list[int]:
        ids = llm.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        return llm.generate(ids, SamplingParams(max_new_tokens=max_new_tokens))[0].token_ids

    run.tokenizer = llm.tokenizer
    return run


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_health_info_models(server):
    assert httpx.get(server.url + "/health").status_code == 200
    info = httpx.get(server.url + "/info").json()
    tgi_fields = {"model_id", "model_sha", "model_pipeline_tag", "max_concurrent_requests", "max_best_of",
                  "max_stop_sequences", "max_input_tokens", "max_total_tokens", "validation_workers",
                  "max_client_batch_size", "router", "version", "sha", "docker_label"}
    assert tgi_fields <= info.keys()
    assert info["speculate_mode"] == "space" and info["max_total_tokens"] == 256
    assert info["prefix_caching"] is True and info["max_batch_prefill_tokens"] == 4096  # the defaults
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == info["model_id"]


def test_inference_client_text_generation(server, reference):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=server.url)
    for prompt in PROMPTS:
        ref = reference(prompt)
        out = client.text_generation(prompt, max_new_tokens=N, details=True, return_full_text=False)
        assert [t.id for t in out.details.tokens] == ref
        assert out.generated_text == reference.tokenizer.decode(ref)
        assert out.details.generated_tokens == len(ref) and out.details.finish_reason in ("length", "eos_token")
        steps = [t.space_step for t in out.details.tokens]
        assert steps == sorted(steps) and steps[0] == 0
        assert max(steps.count(s) for s in set(steps)) <= 4  # at most k + 1 tokens per SPACE step (k = 3)
        plain = client.text_generation(prompt, max_new_tokens=N)
        assert plain == prompt + reference.tokenizer.decode(ref)  # `POST /`: return_full_text defaults to true
        streamed = list(client.text_generation(prompt, max_new_tokens=N, stream=True, details=True))
        assert [s.token.id for s in streamed] == ref
        assert streamed[-1].details.generated_tokens == len(ref)
        assert "".join(s.token.text for s in streamed).strip() == reference.tokenizer.decode(ref, skip_special_tokens=False).strip()


def test_inference_client_chat_completion(server, reference):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=server.url)
    messages = [{"role": "user", "content": "w5 w6"}, {"role": "assistant", "content": "w7"}, {"role": "user", "content": "w8"}]
    ref = reference("w5 w6 w7 w8 ", add_special_tokens=False)
    text = reference.tokenizer.decode(ref)
    out = client.chat_completion(messages, max_tokens=N, temperature=0)
    assert out.choices[0].message.content == text and out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens == len(ref) and out.usage.prompt_tokens == 4
    chunks = list(client.chat_completion(messages, max_tokens=N, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content for c in chunks).strip() == text.strip()
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_openai_client(server, reference):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    ref = reference("w9 w10 ", add_special_tokens=False)
    text = reference.tokenizer.decode(ref)
    messages = [{"role": "user", "content": "w9"}, {"role": "user", "content": "w10"}]
    out = client.chat.completions.create(model="tgi", messages=messages, max_tokens=N, temperature=0)
    assert out.choices[0].message.content == text
    stream = client.chat.completions.create(model="tgi", messages=messages, max_tokens=N, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() == text.strip()
    assert chunks[-1].usage.completion_tokens == len(ref)
    ref = reference("w20 w21")
    comp = client.completions.create(model="tgi", prompt="w20 w21", max_tokens=N, temperature=0)
    assert comp.choices[0].text == reference.tokenizer.decode(ref) and comp.usage.completion_tokens == len(ref)
    pieces = list(client.completions.create(model="tgi", prompt="w20 w21", max_tokens=N, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces).strip() == reference.tokenizer.decode(ref, skip_special_tokens=False).strip()


def test_a_repeated_prompt_reads_its_blocks_from_the_prefix_cache_and_says_so(server, reference):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    prompt = " ".join(f"w{i}" for i in range(30, 52))  # 22 words: 5 full blocks of 4 tokens
    ref = reference(prompt)
    before = metric(httpx.get(server.url + "/metrics").text, "tgi_space_prefix_cache_hit_tokens")
    first = client.completions.create(model="tgi", prompt=prompt, max_tokens=N, temperature=0)
    again = client.completions.create(model="tgi", prompt=prompt, max_tokens=N, temperature=0)
    assert first.choices[0].text == again.choices[0].text == reference.tokenizer.decode(ref)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached > 0 and cached % 4 == 0 and cached < again.usage.prompt_tokens
    after = metric(httpx.get(server.url + "/metrics").text, "tgi_space_prefix_cache_hit_tokens")
    assert after - before >= cached


def test_text_generation_client(server, reference):
    import text_generation

    client = text_generation.Client(server.url)
    ref = reference(PROMPTS[1])
    out = client.generate(PROMPTS[1], max_new_tokens=N)
    assert [t.id for t in out.details.tokens] == ref
    assert [r.token.id for r in client.generate_stream(PROMPTS[1], max_new_tokens=N)] == ref
    sampled = [client.generate(PROMPTS[0], max_new_tokens=N, do_sample=True, seed=7, top_k=20) for _ in range(2)]
    assert sampled[0].generated_text == sampled[1].generated_text and sampled[0].details.seed == 7
    best = client.generate(PROMPTS[0], max_new_tokens=4, best_of=2, do_sample=True)
    assert len(best.details.best_of_sequences) == 1
    top = client.generate(PROMPTS[0], max_new_tokens=4, top_n_tokens=3, decoder_input_details=True)
    assert all(len(t) == 3 for t in top.details.top_tokens) and len(top.details.prefill) == 3


def test_stop_sequence_and_headers(server, reference):
    ref = reference(PROMPTS[0])
    word = reference.tokenizer.decode(ref[3:4])
    r = httpx.post(server.url + "/generate", json={"inputs": PROMPTS[0], "parameters": {"max_new_tokens": N, "stop": [word], "details": True}})
    body = r.json()
    assert body["details"]["finish_reason"] == "stop_sequence" and body["generated_text"].endswith(word)
    assert len(body["details"]["tokens"]) <= 4
    assert int(r.headers["x-generated-tokens"]) == len(body["details"]["tokens"]) and int(r.headers["x-prompt-tokens"]) == 3
    assert {"x-compute-type", "x-total-time", "x-queue-time", "x-inference-time", "x-time-per-token"} <= r.headers.keys()


def test_tokenize_and_metrics(server):
    tokens = httpx.post(server.url + "/tokenize", json={"inputs": "w5 w60"}).json()
    assert [(t["id"], t["text"], t["start"], t["stop"]) for t in tokens] == [(5, "w5", 0, 2), (60, "w60", 3, 6)]
    chat = httpx.post(server.url + "/chat_tokenize", json={"messages": [{"role": "user", "content": "w5"}]}).json()
    assert chat["templated_text"] == "w5 " and [t["id"] for t in chat["tokenize_response"]] == [5]
    text = httpx.get(server.url + "/metrics").text
    assert metric(text, "tgi_request_success") >= 10
    assert metric(text, "tgi_request_count") >= metric(text, "tgi_request_success")
    assert metric(text, "tgi_space_drafted_tokens_total") > 0
    assert metric(text, "tgi_space_accepted_by_position_total", 'position="1"') <= metric(
        text, "tgi_space_drafted_by_position_total", 'position="1"')
    assert metric(text, "tgi_space_tokens_per_step_count") > 0
    assert "tgi_batch_inference_duration_bucket" in text and "tgi_queue_size" in text
    # the engine's decode totals: one row and one token per sequence-step at least; the probed latency curve
    steps, seqs = metric(text, "tgi_space_decode_steps_total"), metric(text, "tgi_space_decode_sequences_total")
    assert 0 < steps <= seqs <= metric(text, "tgi_space_decode_rows_total")
    assert seqs <= metric(text, "tgi_space_decode_tokens_total")
    assert metric(text, "tgi_space_latency_ms", 'batch="1",rows="1"') > 0
