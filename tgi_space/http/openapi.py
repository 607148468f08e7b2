"""`/openapi.json` (and TGI's path, `/api-doc/openapi.json`) with request and response schemas.

The routes read their bodies themselves (TGI's status codes and messages), so FastAPI cannot see
the models; they are attached here, per path and method.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from tgi_space.http import responses as r
from tgi_space.http.schemas import ChatRequest, CompatGenerateRequest, CompletionRequest, GenerateRequest

REQUESTS: dict[tuple[str, str], type[BaseModel]] = {
    ("/generate", "post"): GenerateRequest,
    ("/generate_stream", "post"): GenerateRequest,
    ("/", "post"): CompatGenerateRequest,
    ("/tokenize", "post"): GenerateRequest,
    ("/v1/completions", "post"): CompletionRequest,
    ("/v1/chat/completions", "post"): ChatRequest,
    ("/chat_tokenize", "post"): ChatRequest,
}
JSON, SSE = "application/json", "text/event-stream"
RESPONSES: dict[tuple[str, str], tuple[type[BaseModel], str, bool]] = {  # (model, media type, is a list)
    ("/generate", "post"): (r.GenerateResponse, JSON, False),
    ("/generate_stream", "post"): (r.StreamResponse, SSE, False),
    ("/", "post"): (r.GenerateResponse, JSON, True),
    ("/tokenize", "post"): (r.SimpleToken, JSON, True),
    ("/chat_tokenize", "post"): (r.ChatTokenizeResponse, JSON, False),
    ("/info", "get"): (r.Info, JSON, False),
}


def openapi_schema(app: FastAPI) -> dict:
    """The OpenAPI document, built once."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                         description="TGI's HTTP API and OpenAI routes, served by tgi-space.")
    components = schema.setdefault("components", {}).setdefault("schemas", {})

    def ref(model: type[BaseModel]) -> dict:
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    error = ref(r.ErrorResponse)
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            key = (path, method)
            if key in REQUESTS:
                operation["requestBody"] = {"required": True, "content": {JSON: {"schema": ref(REQUESTS[key])}}}
            if key in RESPONSES:
                model, media, is_list = RESPONSES[key]
                body = {"type": "array", "items": ref(model)} if is_list else ref(model)
                operation["responses"]["200"] = {"description": "OK", "content": {media: {"schema": body}}}
            if method == "post":
                for code in ("400", "413", "422", "424", "429"):
                    operation["responses"][code] = {"description": "TGI's error body", "content": {JSON: {"schema": error}}}
    app.openapi_schema = schema
    return schema
