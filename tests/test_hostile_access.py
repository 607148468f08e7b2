"""TGI's router options around the routes: API key, CORS, JSON logs (issue 11, item 13)."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
from typer.testing import CliRunner

from tests.inprocess_server import InProcessServer
from tgi_space.cli import app
from tgi_space.http.access import JsonFormatter, configure_logging

OK = {"inputs": "w5 w6", "parameters": {"max_new_tokens": 2}}
PREFLIGHT = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "content-type"}


@pytest.fixture(scope="module")
def server(llama_dir):
    srv = InProcessServer(llama_dir, api_key="s3cret").start()
    yield srv
    srv.stop()


def test_api_key_is_required_except_on_health_and_info(server):
    r = httpx.post(server.url + "/generate", json=OK, timeout=60)
    assert r.status_code == 401 and r.json()["error_type"] == "authentication"
    r = httpx.post(server.url + "/generate", json=OK, headers={"Authorization": "Bearer wrong"}, timeout=60)
    assert r.status_code == 401
    r = httpx.post(server.url + "/generate", json=OK, headers={"Authorization": "Bearer s3cret"}, timeout=60)
    assert r.status_code == 200, r.text
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": []}, timeout=60)
    assert r.status_code == 401
    for path in ("/health", "/info", "/metrics"):
        assert httpx.get(server.url + path, timeout=30).status_code == 200, path


def test_browser_preflight_is_answered(server):
    r = httpx.options(server.url + "/generate", headers=PREFLIGHT, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] in ("*", "https://app.example")
    assert "POST" in r.headers["access-control-allow-methods"]


def test_cors_origin_list_is_enforced(llama_dir):
    srv = InProcessServer(llama_dir, cors_allow_origin=["https://ok.example"]).start()
    try:
        bad = httpx.options(srv.url + "/generate", headers=PREFLIGHT, timeout=30)
        good = httpx.options(srv.url + "/generate", headers={**PREFLIGHT, "Origin": "https://ok.example"}, timeout=30)
    finally:
        srv.stop()
    assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers
    assert good.status_code == 200 and good.headers["access-control-allow-origin"] == "https://ok.example"


def test_json_log_lines():
    record = logging.LogRecord("tgi_space.http", logging.WARNING, __file__, 1, "queue %d", (3,), None)
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "WARN" and line["fields"]["message"] == "queue 3" and line["target"] == "tgi_space.http"
    assert "timestamp" in line
    config = configure_logging("info", json_output=True)
    try:
        assert config["loggers"]["uvicorn.access"]["handlers"] == ["json"]
        assert isinstance(logging.getLogger().handlers[0].formatter, JsonFormatter)
    finally:
        configure_logging("warning", json_output=False)


def test_serve_takes_the_options(tmp_path):
    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "none"), "--json-output", "--api-key", "k",
                                      "--cors-allow-origin", "https://a.example"])
    assert result.exit_code == 2 and "no such folder" in result.output, result.output  # options parsed, model refused
