"""Oversized and incomplete request heads get an HTTP status, and half-sent heads are closed (issue 11, item 7)."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from tests.inprocess_server import InProcessServer


@pytest.fixture(scope="module")
def server(llama_dir):
    srv = InProcessServer(llama_dir, head_timeout_s=1.0).start()
    yield srv
    srv.stop()


def exchange(server, head: bytes, timeout: float = 10.0) -> bytes:
    """Send `head` on a fresh socket; everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(head)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("headers", [
    [("X-Big", "a" * 200_000)],  # one 200 KB header
    [(f"X-H{i}", "b" * 8192) for i in range(100)],  # 100 headers of 8 KB
])
def test_oversized_head_is_431_not_a_reset(server, headers):
    head = "GET /health HTTP/1.1\r\nHost: x\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    answer = exchange(server, head.encode())
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b'"error_type": "validation"' in answer and b"too large" in answer
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_half_sent_head_is_closed_after_the_timeout(server):
    start = time.monotonic()
    answer = exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Part", timeout=30)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert time.monotonic() - start < 5


def test_silent_connection_is_closed_after_the_timeout(server):
    start = time.monotonic()
    assert exchange(server, b"", timeout=30) == b""
    assert time.monotonic() - start < 5


def test_slow_but_complete_requests_and_keep_alive_still_work(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        for part in (b"GET /health HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"):
            sock.sendall(part)
            time.sleep(0.3)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    with httpx.Client(base_url=server.url, timeout=10) as client:  # one connection, several requests
        for _ in range(3):
            assert client.get("/health").status_code == 200
            time.sleep(0.4)
