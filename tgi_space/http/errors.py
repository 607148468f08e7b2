"""TGI's error body `{"error": ..., "error_type": ...}`, and reading a JSON body within the payload limit."""

from __future__ import annotations

import json
import math
from typing import TypeVar

import pydantic
from fastapi import Request

from tgi_space.http.encoding import JSONResponse

Model = TypeVar("Model", bound=pydantic.BaseModel)


class ApiError(Exception):
    """An error answered with TGI's error body; `status` as TGI's router (422 validation, 429 overloaded...)."""

    def __init__(self, status: int, error: str, error_type: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.error_type = error_type

    def body(self) -> dict[str, str]:
        """The JSON body, also the SSE error event of TGI routes."""
        return {"error": self.error, "error_type": self.error_type}

    def openai_event(self) -> dict:
        """The SSE error event of the OpenAI routes (TGI's `OpenaiErrorEvent`)."""
        return {"error": {"message": self.error, "http_status_code": 422}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def validation_error(message: str) -> ApiError:
    """422, as TGI's `InferError::ValidationError`."""
    return ApiError(422, f"Input validation error: {message}", "validation")


def overloaded() -> ApiError:
    """429, as TGI when every concurrent-request permit is taken."""
    return ApiError(429, "Model is overloaded", "overloaded")


def generation_error(message: str) -> ApiError:
    """424, as TGI's `InferError::GenerationError`."""
    return ApiError(424, f"Request failed during generation: {message}", "generation")


def unhealthy() -> ApiError:
    """503 while the model loads or after the engine died."""
    return ApiError(503, "unhealthy", "healthcheck")


async def read_json(request: Request, model: type[Model], limit: int) -> Model:
    """Parse the body into `model`: 413 over `limit` bytes, 400 malformed JSON, 422 wrong shape."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    data = parse_json(b"".join(chunks))
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as err:
        raise ApiError(422, _describe(err), "validation") from None


MAX_JSON_DEPTH = 128  # serde_json's recursion limit


class _BadJson(ValueError):
    pass


def parse_json(raw: bytes):
    """JSON as serde_json reads it: 400 for NaN/Infinity, out-of-range numbers, lone surrogates, depth > 128.

    Python's parser accepts all of these; the walk afterwards refuses them, naming where they are.
    """
    try:
        data = json.loads(raw)
        _check_tree(data)
    except (json.JSONDecodeError, UnicodeDecodeError, _BadJson) as err:
        raise ApiError(400, f"Failed to parse the request body as JSON: {err}", "validation") from None
    except RecursionError:
        raise ApiError(400, "Failed to parse the request body as JSON: recursion limit exceeded", "validation") from None
    return data


def _check_tree(data) -> None:
    """Walk the parsed body without recursion: nesting depth, non-finite numbers, strings that are not UTF-8."""
    stack = [(data, "body", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _BadJson(f"recursion limit exceeded (nesting deeper than {MAX_JSON_DEPTH})")
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, float) and not math.isfinite(value):
            raise _BadJson(f"{path}: {value} is not a valid JSON number (numbers must be finite)")
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, path)
                stack.append((item, key if path == "body" else f"{path}.{key}", depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise _BadJson(f"{path}: lone surrogate {text[err.start]!r} at character {err.start} is not valid Unicode") from None


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"Request body is larger than the payload limit of {limit} bytes", "payload_too_large")


def _describe(err: pydantic.ValidationError) -> str:
    """One line per problem: `parameters.max_new_tokens: Input should be a valid integer`."""
    parts = []
    for item in err.errors(include_url=False)[:5]:
        loc = ".".join(str(p) for p in item["loc"]) or "body"
        parts.append(f"{loc}: {item['msg']}")
    return "Failed to deserialize the JSON body into the target type: " + "; ".join(parts)
