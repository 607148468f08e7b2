"""OpenTelemetry traces over OTLP/gRPC (TGI's `--otlp-endpoint` / `--otlp-service-name`).

One server span per HTTP request, named like TGI's router spans (`POST /generate`),
with the route, status code and, for generation routes, the request's generated
token count (from the response's `x-generated-tokens` header). The SDK and exporter
come from the `otel` extra and are imported only when an endpoint is given.
"""

from __future__ import annotations

from fastapi import FastAPI, Request


def add_tracing(app: FastAPI, endpoint: str | None, service_name: str) -> None:
    """Export a span per request to the OTLP collector at `endpoint` (e.g. http://127.0.0.1:4317)."""
    if not endpoint:
        return
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanKind, Status, StatusCode
    except ImportError as err:
        raise ValueError(
            f"--otlp-endpoint needs the OpenTelemetry SDK: pip install 'tgi-space[otel]' ({err})"
        ) from err
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
    tracer = provider.get_tracer("tgi_space.http")
    app.state.tracer_provider = provider  # flushed and shut down with the app

    @app.middleware("http")
    async def trace_request(request: Request, call_next):
        name = f"{request.method} {request.url.path}"
        with tracer.start_as_current_span(name, kind=SpanKind.SERVER) as span:
            span.set_attribute("http.request.method", request.method)
            span.set_attribute("url.path", request.url.path)
            response = await call_next(request)
            span.set_attribute("http.response.status_code", response.status_code)
            generated = response.headers.get("x-generated-tokens")
            if generated is not None:
                span.set_attribute("gen_ai.usage.output_tokens", int(generated))
            if response.status_code >= 500:
                span.set_status(Status(StatusCode.ERROR))
            return response
