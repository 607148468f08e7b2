"""Heavy or poisoned requests never hurt the others (issue 11, items 1 and 2).

- `/health` answers within 1 s while a maximal `/tokenize` or `/generate` input is processed.
- A request that fails inside an engine step fails alone: the other streams finish with the tokens
  they get when run alone, and the KV blocks return to their start value.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.inprocess_server import InProcessServer

PAYLOAD_LIMIT = 420_000  # /tokenize answers ~30 bytes of JSON per token: keep its maximal input moderate
GENERATE_LIMIT = 2_000_000  # TGI's default payload limit
POISON_SEED = 4242


@pytest.fixture(scope="module")
def server(llama_dir):
    srv = InProcessServer(llama_dir, payload_limit=PAYLOAD_LIMIT).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def big_server():
    """The bundled model: its byte-level BPE tokenizer takes seconds on 2 MB (the test model's word level does not)."""
    model = Path(__file__).resolve().parents[1] / "models" / "tiny-space-py"
    if not (model / "tokenizer.json").exists():
        pytest.skip("the bundled model is not here")
    srv = InProcessServer(model, payload_limit=GENERATE_LIMIT).start()
    yield srv
    srv.stop()


def maximal_text(limit: int = PAYLOAD_LIMIT) -> str:
    """Non-ASCII text just under the payload limit (multi-byte characters: offsets differ from bytes)."""
    unit = "w5 héllo wörld 日本語 😀 "
    text = unit * ((limit - 100) // len(unit.encode()))
    assert limit - 200 < len(json.dumps({"inputs": text}, ensure_ascii=False).encode()) < limit
    return text


POLLER = """
import json, sys, time
from pathlib import Path
import httpx
url, stop = sys.argv[1], Path(sys.argv[2])
latencies = []
with httpx.Client(timeout=60) as client:
    while not stop.exists():
        start = time.monotonic()
        client.get(url + "/health").raise_for_status()
        latencies.append(time.monotonic() - start)
        if len(latencies) == 1:
            print("ready", flush=True)
        time.sleep(0.05)
print(json.dumps(latencies), flush=True)
"""


def health_latencies_during(server, route: str, body: dict, tmp_path) -> tuple[list[float], httpx.Response]:
    """/health latencies seen by another process while `body` is processed on `route`, and that call's answer.

    The poller is a process of its own: in this process the server's threads and the poller would share
    one GIL, and a stall that holds it would also stop the clock that is meant to measure it.
    """
    stop = tmp_path / "stop"
    poller = subprocess.Popen([sys.executable, "-c", POLLER, server.url, str(stop)], stdout=subprocess.PIPE, text=True)
    try:
        assert poller.stdout.readline().strip() == "ready"
        content = json.dumps(body, ensure_ascii=False).encode()
        answer = httpx.post(server.url + route, content=content, headers={"content-type": "application/json"},
                            timeout=600)
        stop.touch()
        out, _ = poller.communicate(timeout=120)
    finally:
        if poller.poll() is None:
            poller.kill()
            poller.wait()
    return json.loads(out.strip().splitlines()[-1]), answer


def test_health_answers_during_a_maximal_tokenize(server, tmp_path):
    text = maximal_text()
    latencies, r = health_latencies_during(server, "/tokenize", {"inputs": text}, tmp_path)
    assert r.status_code == 200, r.text[:300]
    tokens = r.json()
    raw = text.encode()
    assert tokens[-1]["stop"] == len(text.rstrip().encode())  # byte offsets, to the very end
    for t in tokens[:50] + tokens[-50:]:
        assert raw[t["start"] : t["stop"]].decode() == t["text"], t
    assert len(latencies) > 3 and max(latencies) < 1.0, (max(latencies), len(latencies))


def test_byte_offsets_of_multibyte_text(server):
    text = "日本 w5 😀é"
    tokens = httpx.post(server.url + "/tokenize", json={"inputs": text}, timeout=30).json()
    raw = text.encode()
    for t in tokens:
        assert raw[t["start"] : t["stop"]].decode() == t["text"], t


def test_health_answers_during_a_maximal_generate(big_server, tmp_path):
    body = {"inputs": maximal_text(GENERATE_LIMIT), "parameters": {"max_new_tokens": 2}}
    latencies, r = health_latencies_during(big_server, "/generate", body, tmp_path)
    assert r.status_code == 422 and "`inputs`" in r.json()["error"]
    assert len(latencies) > 3 and max(latencies) < 1.0, (max(latencies), len(latencies))


# ---- a poisoned request among 8 concurrent streams ------------------------------------------------------


def stream(url: str, body: dict) -> tuple[list[int], dict | None]:
    """Token ids of one /generate_stream call, and its error event if it ended with one."""
    ids, error = [], None
    with httpx.stream("POST", url + "/generate_stream", json=body, timeout=300) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[len("data:"):])
            if "error" in event:
                error = event
            else:
                ids.append(event["token"]["id"])
    return ids, error


def bodies() -> list[dict]:
    out = [{"inputs": f"w{5 + 3 * i} w{6 + 5 * i} w{9 + i}", "parameters": {"max_new_tokens": 12 + i}} for i in range(8)]
    out[3]["parameters"].update(do_sample=True, seed=POISON_SEED)
    return out


def test_a_poisoned_request_among_eight_streams_fails_alone(server, monkeypatch):
    import tgi_space.engine

    original = tgi_space.engine.process

    def poisoned(logits, params, *args, **kwargs):  # stands in for any per-request failure inside a step
        if params.seed == POISON_SEED:
            raise FloatingPointError("poisoned request")
        return original(logits, params, *args, **kwargs)

    import tgi_space.speculation

    monkeypatch.setattr(tgi_space.engine, "process", poisoned)  # the paper's fixed layout
    monkeypatch.setattr(tgi_space.speculation, "process", poisoned)  # the planned tree step
    engine = server.state.service.engine
    free_at_start = engine.block_manager.num_free_blocks
    healthy = [b for i, b in enumerate(bodies()) if i != 3]
    alone = [stream(server.url, b)[0] for b in healthy]
    assert engine.block_manager.num_free_blocks == free_at_start

    results: list = [None] * 8
    threads = [threading.Thread(target=lambda i=i, b=b: results.__setitem__(i, stream(server.url, b)))
               for i, b in enumerate(bodies())]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    poisoned_ids, poisoned_error = results.pop(3)
    assert poisoned_error is not None and poisoned_error["error_type"] == "generation"
    assert "poisoned request" in poisoned_error["error"]
    assert [r[1] for r in results] == [None] * 7
    assert [r[0] for r in results] == alone
    assert engine.block_manager.num_free_blocks == free_at_start
    assert httpx.get(server.url + "/health").status_code == 200


def test_worker_reports_an_engine_isolated_failure_to_its_request_only():
    """The contract with the engine: a sequence that failed alone comes back with `error` set."""
    import asyncio

    from tgi_space.http.metrics import Metrics
    from tgi_space.http.worker import EngineWorker, RequestHandle
    from tgi_space.sampling import SamplingParams
    from tgi_space.sequence import Sequence, TokenInfo

    class FakeEngine:
        class block_manager:  # noqa: N801 - stands in for the attribute
            num_blocks = num_free_blocks = 8

    async def run():
        worker = EngineWorker(FakeEngine(), Metrics())
        loop = asyncio.get_running_loop()
        failed, healthy = (Sequence(i, [1, 2], SamplingParams(), False, None) for i in range(2))
        failed.error, failed.finish_reason = "FloatingPointError: poisoned request", "error"
        handles = {s.seq_id: RequestHandle([1, 2], s.params, "none", loop) for s in (failed, healthy)}
        worker.handles = dict(handles)
        worker._publish(failed, [], ([], []))
        worker._publish(healthy, [TokenInfo(5, -0.1, [], 0)], ([], []))
        bad, good = await handles[0].outputs.get(), await handles[1].outputs.get()
        return bad, good, worker.handles

    bad, good, left = asyncio.run(run())
    assert bad.error == "FloatingPointError: poisoned request" and good.error is None and good.tokens[0].token_id == 5
    assert list(left) == [1]  # the healthy request is still in flight
