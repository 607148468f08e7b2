"""Server-sent events, as TGI sends them (`data: {json}` then a blank line; clients match `data: [DONE]`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from tgi_space.http.encoding import dumps
from tgi_space.http.errors import ApiError


def event(data: dict | str) -> bytes:
    """One SSE event; dicts are sent as compact JSON."""
    payload = data if isinstance(data, str) else dumps(data)
    return f"data: {payload}\n\n".encode()


def sse_response(
    events: AsyncIterator[dict | str], on_error: Callable[[ApiError], dict], on_close: Callable[[], None]
) -> StreamingResponse:
    """Stream `events`; an ApiError mid-stream becomes one error event; `on_close` runs however it ends."""

    async def body():
        try:
            async for item in events:
                yield event(item)
        except ApiError as err:
            yield event(on_error(err))
        finally:
            await events.aclose()
            on_close()

    headers = {"X-Accel-Buffering": "no", "Cache-Control": "no-cache"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)
