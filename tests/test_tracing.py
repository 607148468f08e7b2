"""`--otlp-endpoint`: a span per request reaches an OTLP/gRPC collector (a real one, in the test)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest

from tests.inprocess_server import InProcessServer

trace_service = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc")
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2  # noqa: E402


class Collector(trace_service.TraceServiceServicer):
    """Receives OTLP trace exports and keeps (span name, attributes)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, dict]] = []

    def Export(self, request, context):  # noqa: N802 (gRPC method name)
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attrs = {a.key: a.value.int_value or a.value.string_value for a in span.attributes}
                    self.spans.append((span.name, attrs))
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def collector():
    servicer = Collector()
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    trace_service.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"http://127.0.0.1:{port}"
    server.stop(None)


def test_generate_requests_are_traced(llama_dir, collector):
    servicer, endpoint = collector
    server = InProcessServer(llama_dir, otlp_endpoint=endpoint, otlp_service_name="tgi-space-test").start()
    try:
        body = {"inputs": "w5 w6", "parameters": {"max_new_tokens": 3}}
        assert httpx.post(f"{server.url}/generate", json=body, timeout=60).status_code == 200
        assert httpx.post(f"{server.url}/generate", json={"inputs": ""}, timeout=60).status_code == 422
    finally:
        server.stop()  # the app's shutdown flushes the exporter
    spans = dict((name + str(attrs["http.response.status_code"]), attrs) for name, attrs in servicer.spans)
    ok = spans["POST /generate200"]
    assert ok["gen_ai.usage.output_tokens"] == 3 and ok["url.path"] == "/generate"
    assert "POST /generate422" in spans


def test_no_endpoint_no_tracing(llama_dir):
    server = InProcessServer(llama_dir)
    assert getattr(server.app.state, "tracer_provider", None) is None
