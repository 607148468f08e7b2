"""The FastAPI application: state, error handlers, and loading the engine without blocking `/health`."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tgi_space import __version__
from tgi_space.config import EngineConfig, SpacePolicy
from tgi_space.engine import Engine
from tgi_space.http import routes_openai, routes_tgi
from tgi_space.http.access import add_access_control
from tgi_space.http.tracing import add_tracing
from tgi_space.http.chat import ChatTemplate
from tgi_space.http.encoding import JSONResponse
from tgi_space.http.errors import ApiError
from tgi_space.http.metrics import Metrics
from tgi_space.http.openapi import openapi_schema
from tgi_space.http.service import ClientGone, Service
from tgi_space.http.settings import ServeSettings
from tgi_space.http.validation import Limits
from tgi_space.http.worker import EngineWorker

log = logging.getLogger(__name__)


class ServerState:
    """What the routes read: settings, metrics, and once loaded the service and chat template."""

    def __init__(self, settings: ServeSettings, model_dir: str) -> None:
        self.settings = settings
        self.model_dir = model_dir
        self.model_id = settings.model_id
        self.metrics = Metrics()
        self.service: Service | None = None
        self.chat_template: ChatTemplate | None = None
        self.load_error: BaseException | None = None

    def load(self) -> None:
        """Build the engine, start its thread, then publish the service (so /health turns 200)."""
        s = self.settings
        device = s.resolve_device(torch.cuda.is_available())
        if device == "cpu":
            torch.set_num_threads(s.resolve_num_threads())
        engine_options = dict(
            model_dir=self.model_dir, adapter=s.adapter, datastore=s.datastore, dtype=s.dtype, device=device,
            block_size=s.block_size, kv_cache_bytes=s.kv_cache_bytes, prefix_caching=s.prefix_caching,
            max_num_batched_tokens=s.max_batch_prefill_tokens, seed=s.seed,
            space=SpacePolicy(
                k_max=s.space_k_max, max_step_query_tokens=s.max_step_query_tokens, planner=not s.fixed_layout,
                drafters=s.drafters, max_tree_nodes=s.max_tree_nodes, max_tree_depth=s.max_tree_depth,
                mask_top_m=s.mask_top_m, suffix_min_match=s.suffix_min_match, suffix_max_match=s.suffix_max_match,
                suffix_shared_tokens=s.suffix_shared_tokens, survival_calibration=s.survival_calibration,
                speculate_mode="sdsat" if s.speculate_mode == "sdsat" else "space", sdsat_tree_sizes=s.sdsat_tree_sizes,
            ),
        )
        if s.max_batch_size:
            engine_options["max_num_seqs"] = s.max_batch_size
        if s.attention_backend is not None:
            engine_options["attention_backend"] = s.attention_backend
        engine = Engine(EngineConfig(**engine_options))
        if engine.planned:  # probe t(rows, batch) now, on an idle CPU, not under the first requests' load
            engine.speculator.latency()
        kv_tokens = engine.num_slots - max(engine.k_max, engine.config.space.max_tree_depth if engine.planned else 0)
        max_input, max_total = s.resolve_limits(engine.model_config.max_model_len, kv_tokens)
        limits = Limits(s.max_best_of, s.max_stop_sequences, s.max_top_n_tokens, max_input, max_total)
        can_speculate = engine.planned or engine.mask_token_id is not None  # suffix drafts need no mask token
        speculate = s.speculate_mode or ("space" if can_speculate else "none")
        if speculate == "space" and not can_speculate:
            raise ValueError("--speculate-mode space needs a SPACE checkpoint (config.json space_mask_token_id) "
                             "or the planned step with suffix drafts (--drafters suffix, no --fixed-layout)")
        if speculate == "sdsat":
            engine.check_sdsat()  # names the config.json field SDSAT lacks
        self.metrics.watch(engine)
        worker = EngineWorker(engine, self.metrics)
        worker.start()
        self.chat_template = ChatTemplate(engine.tokenizer)
        self.service = Service(
            engine, worker, self.metrics, limits, speculate, s.max_concurrent_requests, s.validation_workers
        )
        log.info("model %s loaded (speculate=%s, k_max=%d)", self.model_id, speculate, engine.k_max)

    def info(self) -> dict:
        """TGI's `Info`, plus the prefill budget, prefix caching, `speculate_mode` and `space_k_max`."""
        s, service = self.settings, self.service
        limits = service.limits if service else None
        return {
            "model_id": self.model_id,
            "model_sha": None,
            "model_pipeline_tag": None,
            "max_concurrent_requests": s.max_concurrent_requests,
            "max_best_of": s.max_best_of,
            "max_stop_sequences": s.max_stop_sequences,
            "max_input_tokens": limits.max_input_tokens if limits else s.max_input_tokens,
            "max_total_tokens": limits.max_total_tokens if limits else s.max_total_tokens,
            "validation_workers": s.validation_workers,
            "max_client_batch_size": s.max_client_batch_size,
            "router": "tgi-space",
            "version": __version__,
            "sha": None,
            "docker_label": None,
            "max_batch_prefill_tokens": s.max_batch_prefill_tokens,  # prompt tokens per step (longer: chunked)
            "prefix_caching": s.prefix_caching,
            "speculate_mode": service.speculate if service else s.speculate_mode,
            "space_k_max": service.engine.k_max if service else s.space_k_max,
            "speculation": _speculation_info(service),
        }


def _speculation_info(service) -> dict | None:
    """The planned step's figures (when planned), plus SDSAT's when the server decodes with SDSAT."""
    if service is None:
        return None
    engine = service.engine
    info = engine.speculator.info() if engine.planned else None
    if service.speculate == "sdsat":
        info = {**(info or {}), "sdsat": engine.sdsat.info()}
    return info


def create_app(settings: ServeSettings, model_dir: str, load_in_background: bool = True) -> FastAPI:
    """The app; the engine loads in a thread at start-up (or before returning, for in-process tests)."""
    state = ServerState(settings, model_dir)

    def load() -> None:
        try:
            state.load()
        except BaseException as err:  # logged, then the server shuts down (exit status 143)
            log.exception("loading the model failed")
            state.load_error = err
            os.kill(os.getpid(), signal.SIGTERM)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if load_in_background:
            threading.Thread(target=load, name="tgi-space-load", daemon=True).start()
        yield
        if state.service is not None:
            state.service.tokenizers.close()
            await asyncio.to_thread(state.service.worker.stop)
        provider = getattr(app.state, "tracer_provider", None)
        if provider is not None:  # flush the last spans to the collector
            await asyncio.to_thread(provider.shutdown)

    if not load_in_background:
        state.load()
    app = FastAPI(title="tgi-space", version=__version__, lifespan=lifespan)
    app.state.tgi = state
    app.include_router(routes_openai.router)
    app.include_router(routes_tgi.router)
    add_access_control(app, settings.api_key, settings.cors_allow_origin)
    add_tracing(app, settings.otlp_endpoint, settings.otlp_service_name)
    app.openapi = lambda: openapi_schema(app)
    app.add_api_route("/api-doc/openapi.json", lambda: JSONResponse(app.openapi()), include_in_schema=False)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(ClientGone, _client_gone)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    return app


async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    return err.response()


async def _request_validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    return JSONResponse({"error": str(err), "error_type": "validation"}, status_code=422)


async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    """Routing errors (unknown route 404, wrong method 405) in TGI's error shape."""
    kind = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http")
    return JSONResponse({"error": f"{err.detail}: {request.method} {request.url.path}", "error_type": kind},
                        status_code=err.status_code, headers=getattr(err, "headers", None))


async def _client_gone(request: Request, err: ClientGone) -> JSONResponse:
    """Nobody reads it; 499 (nginx's "client closed request") in the access log."""
    return JSONResponse({"error": "client disconnected", "error_type": "cancelled"}, status_code=499)


async def _internal_error(request: Request, err: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return JSONResponse({"error": f"{type(err).__name__}: {err}", "error_type": "internal"}, status_code=500)
