"""Short load test and cancellation against `tgi-space serve`: nothing lost, blocks all returned."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from benchmarks.load import run_load, speculation_figures
from tests.http_server import ServerProcess, metric

CLIENTS, SECONDS = 50, 10.0


@pytest.fixture(scope="module")
def server(llama_dir, tmp_path_factory):
    from tests.http_server import with_chat_template

    model = with_chat_template(llama_dir, tmp_path_factory.mktemp("chat-llama"))
    proc = ServerProcess(model, tmp_path_factory.mktemp("logs") / "server.log", "--max-concurrent-requests", "32")
    try:
        yield proc.wait_healthy()
    finally:
        proc.stop()


def wait_idle(url: str, timeout: float = 30.0) -> str:
    """/metrics once no request runs and every KV block is free again."""
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(url + "/metrics").text
        idle = metric(text, "tgi_batch_current_size") == 0 and metric(text, "tgi_queue_size") == 0
        if idle and metric(text, "tgi_space_kv_cache_free_blocks") == metric(text, "tgi_space_kv_cache_blocks"):
            return text
        if time.monotonic() > deadline:
            raise AssertionError("server did not return to idle:\n" + text)
        time.sleep(0.2)


def test_load_nothing_lost(server):
    result = asyncio.run(run_load(server.url, CLIENTS, SECONDS, max_new_tokens=8))
    summary = result.summary()
    print(summary)
    assert summary["lost"] == {}, summary
    assert summary["answered"] == summary["sent"] and summary["ok"] > 0, summary
    assert set(summary["refused"]) <= {"429 overloaded"}, summary  # 50 clients, 32 permits
    text = wait_idle(server.url)
    failures = sum(metric(text, "tgi_request_failure", f'err="{e}"') for e in ("overloaded", "validation", "generation", "cancelled"))
    assert metric(text, "tgi_request_count") == metric(text, "tgi_request_success") + failures
    assert metric(text, "tgi_request_failure", 'err="overloaded"') == summary["refused"].get("429 overloaded", 0)
    figures = speculation_figures(text)
    assert figures["mean_tokens_per_step"] >= 1.0 and figures["acceptance_by_position"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_disconnect_mid_stream_frees_blocks(server):
    """Read three events of a long stream, drop the connection: the request is aborted, its blocks freed."""
    before = wait_idle(server.url)
    body = {"inputs": "w5 w6 w7", "parameters": {"max_new_tokens": 240}}
    with httpx.stream("POST", server.url + "/generate_stream", json=body, timeout=30) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data:")
            if seen == 3:
                break
    text = wait_idle(server.url)  # asserts free blocks == total blocks
    cancelled = 'err="cancelled"'
    assert metric(text, "tgi_request_failure", cancelled) == metric(before, "tgi_request_failure", cancelled) + 1
    assert metric(text, "tgi_request_success") == metric(before, "tgi_request_success")


def test_disconnect_before_a_generate_answer_frees_blocks(server):
    """A non-streaming client that gives up (timeout) has its generation cancelled too."""
    before = wait_idle(server.url)
    # No EOS on this random model. Sampling hot, with a repetition penalty, so no draft is ever accepted:
    # 250 one-token steps, far longer than the server's 0.1 s disconnect poll (greedy output of a random
    # model repeats itself, and speculation then finishes it before the poll notices).
    params = {"max_new_tokens": 250, "do_sample": True, "temperature": 1.5, "repetition_penalty": 1.3, "seed": 1}
    body = {"inputs": "w5 w6 w7", "parameters": params}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/generate", json=body, timeout=httpx.Timeout(5.0, read=0.1))
    text = wait_idle(server.url)
    cancelled = 'err="cancelled"'
    assert metric(text, "tgi_request_failure", cancelled) == metric(before, "tgi_request_failure", cancelled) + 1
    assert metric(text, "tgi_request_success") == metric(before, "tgi_request_success")
