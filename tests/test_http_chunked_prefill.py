"""`tgi-space serve` with a small --max-batch-prefill-tokens: long prompts are computed in chunks over several
steps (the engine's partial plans), and streams and whole answers carry exactly the offline engine's tokens."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.http_server import ENGINE_ARGS
from tests.inprocess_server import InProcessServer
from tgi_space.llm import LLM
from tgi_space.sampling import SamplingParams

N = 10


@pytest.fixture(scope="module")
def server(llama_dir):
    srv = InProcessServer(llama_dir, max_batch_prefill_tokens=8).start()
    yield srv
    srv.stop()


def test_long_prompts_in_chunks_answer_as_the_offline_engine(server, llama_dir):
    reference = LLM(str(llama_dir), **ENGINE_ARGS)
    prompts = [" ".join(f"w{i + j}" for i in range(3, 33)) for j in range(3)]  # ~30 tokens: 4 chunks of 8
    expected = [reference.tokenizer.decode(reference.generate(reference.tokenizer.encode(p),
                                                              SamplingParams(max_new_tokens=N))[0].token_ids)
                for p in prompts]

    def whole(prompt):
        body = {"inputs": prompt, "parameters": {"max_new_tokens": N, "details": True}}
        return httpx.post(server.url + "/generate", json=body, timeout=120).json()

    def streamed(prompt):
        body = {"inputs": prompt, "parameters": {"max_new_tokens": N}}
        with httpx.stream("POST", server.url + "/generate_stream", json=body, timeout=120) as r:
            events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
        return events

    with ThreadPoolExecutor(6) as pool:
        wholes = list(pool.map(whole, prompts))
        streams = list(pool.map(streamed, prompts))
    assert [w["generated_text"] for w in wholes] == expected
    assert all(w["details"]["generated_tokens"] == N for w in wholes)
    for events, text in zip(streams, expected):
        assert len(events) == N  # one event per token: chunk steps send none
        assert events[-1]["generated_text"] == text
