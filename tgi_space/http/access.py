"""API key, CORS and JSON logs: the router options of TGI that sit around the routes."""

from __future__ import annotations

import hmac
import json
import logging
import sys
from datetime import datetime, timezone

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware

from tgi_space.http.encoding import JSONResponse

OPEN_PATHS = {"/", "/health", "/ping", "/info", "/metrics", "/openapi.json", "/api-doc/openapi.json", "/docs"}


def add_access_control(app: FastAPI, api_key: str | None, cors_allow_origin: list[str] | None) -> None:
    """TGI's `--api-key` (Bearer token on every route but health, info, metrics, docs) and CORS layer."""
    if api_key:
        expected = f"Bearer {api_key}".lower().encode()

        @app.middleware("http")
        async def require_api_key(request: Request, call_next):
            if request.method == "OPTIONS" or (request.method == "GET" and request.url.path in OPEN_PATHS):
                return await call_next(request)
            given = request.headers.get("authorization", "").lower().encode()
            if not hmac.compare_digest(given, expected):
                return JSONResponse({"error": "Unauthorized: send the API key as `Authorization: Bearer <key>`",
                                     "error_type": "authentication"}, status_code=401)
            return await call_next(request)

    origins = ["*"] if not cors_allow_origin else cors_allow_origin  # TGI: any origin unless a list is given
    app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                       allow_headers=["content-type", "authorization"])


class JsonFormatter(logging.Formatter):
    """One JSON object per line, shaped like TGI's router logs (tracing-subscriber's JSON format)."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {"message": record.getMessage()}
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        return json.dumps({
            "timestamp": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="microseconds"),
            "level": record.levelname.replace("WARNING", "WARN"),
            "fields": fields,
            "target": record.name,
        }, ensure_ascii=False)


def configure_logging(level: str, json_output: bool) -> dict | None:
    """Root logging; with json_output also the uvicorn config's loggers. Returns uvicorn's `log_config`."""
    handler = logging.StreamHandler(sys.stdout if json_output else sys.stderr)
    handler.setFormatter(JsonFormatter() if json_output else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    if not json_output:
        return None
    return {  # uvicorn's own loggers through the same JSON formatter
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"json": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout"}},
        "loggers": {name: {"handlers": ["json"], "level": level.upper(), "propagate": False}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
    }
