"""The gRPC v3 TextGenerationService: protobuf in and out here, everything else in `Shard`."""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
from concurrent import futures
from typing import Any, Callable

import grpc
from prometheus_client import CollectorRegistry, start_http_server

from tgi_space.engine import Engine
from tgi_space.http.metrics import EngineCollector
from tgi_space.server.interceptor import ExceptionInterceptor
from tgi_space.server.options import ServeOptions, UnsupportedOption
from tgi_space.server.protogen import load_pb
from tgi_space.server.shard import Shard, StepResult

log = logging.getLogger(__name__)

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.max_send_message_length", 2**31 - 1),
]


class ShuttingDown(RuntimeError):
    """The shard stopped before this request's engine work ran."""


class EngineRunner:
    """Runs every call that touches the engine on one thread: the main thread, in `serve_forever`.

    torch's OpenMP runtime gives each thread that runs parallel work its own team of worker threads.
    With a team per gRPC worker thread there are more OpenMP threads than cores, and the runtime then
    stops spinning between parallel regions: every op pays a sleep/wake-up, and a step ran 2-3x slower
    than the same step on the thread that loaded the model (measured here, 2 cores). One thread, one
    team. Until `run_until` runs (in-process tests), calls run on the caller's thread.
    """

    def __init__(self) -> None:
        self.jobs: queue.Queue = queue.Queue()
        self.active = False
        self.lock = threading.Lock()  # `active` and the queue change together: no job is queued after the drain

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on the engine thread; its result or its exception."""
        future: futures.Future | None = None
        with self.lock:
            if self.active:
                future = futures.Future()
                self.jobs.put((future, fn, args))
        return fn(*args) if future is None else future.result()

    def run_until(self, stopped: threading.Event, poll_s: float = 0.05) -> None:
        """Run submitted calls on this thread until `stopped`; calls still queued then fail (ShuttingDown)."""
        self.active = True
        try:
            while not stopped.is_set():
                try:
                    future, fn, args = self.jobs.get(timeout=poll_s)
                except queue.Empty:
                    continue
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args))
                    except BaseException as err:  # the caller's RPC raises it (the interceptor maps it)
                        future.set_exception(err)
        finally:
            with self.lock:
                self.active = False
                while not self.jobs.empty():
                    future, _, _ = self.jobs.get_nowait()
                    future.set_exception(ShuttingDown("the shard is shutting down"))


class TextGenerationService:
    """The eight RPCs of generate.v3.TextGenerationService."""

    def __init__(self, shard: Shard, urls: list[str], runner: EngineRunner | None = None) -> None:
        self.shard = shard
        self.urls = urls
        self.runner = runner or EngineRunner()
        self.pb2, _ = load_pb()

    def Info(self, request, context):
        info = self.shard.info()
        msg = self.pb2.InfoResponse(
            requires_padding=info.requires_padding,
            dtype=info.dtype,
            device_type=info.device_type,
            speculate=info.speculate,
            support_chunking=info.support_chunking,
            use_prefix_caching=info.use_prefix_caching,
            attention_impl=info.attention_impl,
            block_size=info.block_size,
        )
        if info.window_size is not None:
            msg.window_size = info.window_size
        return msg

    def Health(self, request, context):
        return self.pb2.HealthResponse()

    def ServiceDiscovery(self, request, context):
        return self.pb2.ServiceDiscoveryResponse(urls=self.urls)

    def ClearCache(self, request, context):
        self.runner.call(self.shard.clear, request.id if request.HasField("id") else None)
        return self.pb2.ClearCacheResponse()

    def FilterBatch(self, request, context):
        batch = self.runner.call(self.shard.filter, request.batch_id, list(request.request_ids))
        return self.pb2.FilterBatchResponse(batch=batch.to_pb(self.pb2))

    def Warmup(self, request, context):
        result = self.runner.call(
            self.shard.warmup,
            request.batch,
            request.max_input_tokens if request.HasField("max_input_tokens") else None,
            request.max_total_tokens if request.HasField("max_total_tokens") else None,
            request.max_prefill_tokens,
        )
        return self.pb2.WarmupResponse(
            max_supported_total_tokens=result.max_supported_total_tokens,
            max_input_tokens=result.max_input_tokens,
            max_total_tokens=result.max_total_tokens,
        )

    def Prefill(self, request, context):
        cached = request.cached_batch.id if request.HasField("cached_batch") else None
        return self._step_response(self.pb2.PrefillResponse, self.runner.call(self.shard.prefill, request.batch, cached))

    def Decode(self, request, context):
        result = self.runner.call(self.shard.decode, [b.id for b in request.batches])
        return self._step_response(self.pb2.DecodeResponse, result)

    def _step_response(self, response_type, result: StepResult):
        msg = response_type(
            generations=[g.to_pb(self.pb2) for g in result.generations],
            forward_ns=result.forward_ns,
            decode_ns=result.decode_ns,
            total_ns=result.total_ns,
        )
        if result.batch is not None:
            msg.batch.CopyFrom(result.batch.to_pb(self.pb2))
        if result.concat_ns is not None:
            msg.concat_ns = result.concat_ns
        return msg


def build_shard(options: ServeOptions) -> Shard:
    """Load the model and allocate the KV cache."""
    engine = Engine(options.engine_config())
    speculate = options.speculate_mode != "none"
    return Shard(engine, speculate, options.watermark, method=options.speculate_mode if speculate else "space",
                 chunking=options.prefill_chunking, prefix_caching=options.prefix_caching)


def create_server(
    shard: Shard, options: ServeOptions, max_workers: int = 4, runner: EngineRunner | None = None
) -> grpc.Server:
    """A started gRPC server on `unix://{uds_path}-{rank}` (a stale socket file is removed first);
    engine work runs through `runner` (inline on the RPC's thread when None)."""
    _, pb2_grpc = load_pb()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=[ExceptionInterceptor()],
        options=GRPC_OPTIONS,
    )
    pb2_grpc.add_TextGenerationServiceServicer_to_server(TextGenerationService(shard, options.urls(), runner), server)
    if os.path.exists(options.socket_path):
        os.unlink(options.socket_path)
    server.add_insecure_port(f"unix://{options.socket_path}")
    server.start()
    return server


def serve_metrics(engine: Engine, host: str, port: int) -> None:
    """Prometheus metrics of `engine` on http://host:port/metrics, from a daemon thread (TGI_SPACE_METRICS_PORT)."""
    registry = CollectorRegistry()  # no auto_describe: the engine is read at each scrape, not at registration
    registry.register(EngineCollector(engine, drafters=True))
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as err:  # in use, or an address this machine does not have
        raise UnsupportedOption(f"TGI_SPACE_METRICS_PORT={port} (TGI_SPACE_METRICS_HOST={host}): cannot listen: {err}") from err
    log.info("Metrics at http://%s:%d/metrics", host, port)


def serve_forever(options: ServeOptions) -> None:
    """Load, then bind (so the socket file means 'ready'), then serve until SIGTERM/SIGINT."""
    log.info("Loading %s (dtype %s, device %s, speculate %s)", options.model_dir, options.dtype, options.device,
             options.speculate_mode)
    shard = build_shard(options)
    info = shard.info()
    log.info(
        "SPACE k=%d, block size %d, %d KV slots; mask rows use no cache slots (no scratch space)",
        info.speculate, info.block_size, shard.ctx.num_slots,
    )
    if options.metrics_port is not None:
        serve_metrics(shard.engine, options.metrics_host, options.metrics_port)
    runner = EngineRunner()
    server = create_server(shard, options, runner=runner)
    log.info("Server started at unix://%s", options.socket_path)
    stopped = threading.Event()

    def stop(signum, frame):
        log.info("Received signal %d, stopping", signum)
        stopped.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    runner.run_until(stopped)  # engine work on this thread, the one that loaded the model
    server.stop(grace=5).wait()
    if os.path.exists(options.socket_path):
        os.unlink(options.socket_path)
