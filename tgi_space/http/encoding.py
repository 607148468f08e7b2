"""JSON out as TGI's serde_json writes it: a non-finite float (a `-inf` log-probability) is `null`."""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi.responses import JSONResponse as _FastApiJSONResponse


def dumps(data: Any) -> str:
    """Compact JSON; NaN and +-inf become null (plain `json.dumps` would write `-Infinity`, not JSON)."""
    try:
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:  # rare: only when a value is not finite, so the walk is paid only then
        return json.dumps(finite(data), separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def finite(data: Any) -> Any:
    """A copy of `data` with every non-finite float replaced by None."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(v) for v in data]
    return data


class JSONResponse(_FastApiJSONResponse):
    """FastAPI's JSONResponse with `dumps` (non-finite floats as null)."""

    def render(self, content: Any) -> bytes:
        return dumps(content).encode("utf-8")
