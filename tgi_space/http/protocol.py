"""uvicorn's h11 protocol with the limits a public server needs on request heads.

- A head larger than `max_head_bytes` gets 431 with TGI's error body. uvicorn answered 400 and closed
  at once, while the client was still sending: the kernel then reset the connection and the client
  never saw a status. Here the socket is half-closed and drained for a moment ("lingering close").
- A head that does not complete within `head_timeout_s` (a client that sends half a header and
  waits) gets 408 and the connection is closed; uvicorn never closed those.
"""

from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_HEAD_BYTES = 64 * 1024
HEAD_TIMEOUT_S = 10.0
LINGER_S = 2.0


def guarded_protocol(head_timeout_s: float = HEAD_TIMEOUT_S) -> type[H11Protocol]:
    """The protocol class to give uvicorn (`http=`), with this head timeout."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"head_timeout_s": head_timeout_s})


class GuardedH11Protocol(H11Protocol):
    """H11Protocol + 431 for oversized heads (with a lingering close) + a timeout on incomplete heads."""

    head_timeout_s = HEAD_TIMEOUT_S

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = None
        self._draining = False
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._draining:  # answered already: read and drop what the client still sends
            return
        if self.conn.their_state is h11.IDLE:
            self._arm_head_timer()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE and self._head_timer is not None:
            self._head_timer.cancel()  # a whole head arrived
            self._head_timer = None

    def connection_lost(self, exc) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # arms uvicorn's keep-alive timer for the idle time after it
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return
        if self.conn.trailing_data[0]:  # part of a head arrived: say why we hang up
            self._send_error(408, "Request head not received in time", "timeout")
        else:
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """h11 refused the head; a head over the size limit is TGI's 431, anything else 400."""
        if len(self.conn.trailing_data[0]) > MAX_HEAD_BYTES:
            self._send_error(431, f"Request header fields too large (limit {MAX_HEAD_BYTES} bytes)", "validation")
        else:
            self._send_error(400, "Invalid HTTP request received", "validation")

    def _send_error(self, status: int, error: str, error_type: str) -> None:
        body = json.dumps({"error": error, "error_type": error_type}).encode()
        head = (f"HTTP/1.1 {status} {h11_reason(status)}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
        self.transport.write(head + body)
        self._draining = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


def h11_reason(status: int) -> str:
    return {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large"}[status]
