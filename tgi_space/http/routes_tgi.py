"""TGI's own routes: `/generate`, `/generate_stream`, `/`, `/tokenize`, `/info`, `/health`, `/metrics`."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import time

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

from tgi_space.http.encoding import JSONResponse
from tgi_space.http.errors import ApiError, read_json, unhealthy
from tgi_space.http.schemas import CompatGenerateRequest, GenerateRequest
from tgi_space.http.service import Generation, Service, TokenEvent, unless_disconnected
from tgi_space.http.sse import sse_response
from tgi_space.http.validation import ValidRequest, check_stream_request

router = APIRouter()


def service_of(request: Request) -> Service:
    """The loaded service, or 503 while the model loads."""
    service = request.app.state.tgi.service
    if service is None:
        raise unhealthy()
    return service


async def parse(request: Request, model):
    return await read_json(request, model, request.app.state.tgi.settings.payload_limit)


# ---- /generate ------------------------------------------------------------------------------


@router.post("/generate")
async def generate(request: Request) -> Response:
    """Generate tokens (TGI's `GenerateResponse`, `details` when asked)."""
    service = service_of(request)
    req = await parse(request, GenerateRequest)
    return await _generate(request, service, req, return_full_text=bool(req.parameters.return_full_text))


async def _generate(request: Request, service: Service, req: GenerateRequest, return_full_text: bool, as_list: bool = False) -> Response:
    started = time.monotonic()
    service.metrics.request_count.inc()
    with service.permit():
        valid = await service.validate(req.inputs, req.parameters)
        if valid.best_of > 1:
            runs = asyncio.gather(*(service.generate(_reseeded(valid), started, i == 0) for i in range(valid.best_of)))
            runs = await unless_disconnected(request, runs)
            best = max(runs, key=lambda g: sum(t.logprob for t in g.tokens))
        else:
            runs, best = [], await unless_disconnected(request, service.generate(valid, started))
    prefix = req.inputs if return_full_text else ""
    body = {"generated_text": prefix + best.text}
    if req.parameters.details or req.parameters.decoder_input_details:
        body["details"] = details(service, best, valid, req.parameters.decoder_input_details)
        if runs:
            body["details"]["best_of_sequences"] = [
                {"generated_text": prefix + g.text, **details(service, g, valid, req.parameters.decoder_input_details)}
                for g in runs if g is not best
            ]
    return JSONResponse([body] if as_list else body, headers=_headers(req.inputs, best))


def _reseeded(valid: ValidRequest) -> ValidRequest:
    """best_of: every sequence samples with its own seed."""
    seed = random.getrandbits(63)
    return dataclasses.replace(valid, params=dataclasses.replace(valid.params, seed=seed), seed=seed)


def details(service: Service, g: Generation, valid: ValidRequest, with_prefill: bool) -> dict:
    """TGI's `Details`, plus `space` (this request's speculation figures)."""
    tok = service.engine.tokenizer
    logprobs = g.stats.prompt_logprobs or [None] * len(valid.input_ids)  # the first token has none, as in TGI
    prefill = [{"id": i, "text": tok.token_text(i), "logprob": lp} for i, lp in zip(valid.input_ids, logprobs)] \
        if with_prefill else []
    out = {
        "finish_reason": g.finish_reason,
        "generated_tokens": len(g.tokens),
        "seed": g.seed,
        "prefill": prefill,
        "tokens": [t.as_dict() for t in g.tokens],
        "space": space_summary(g.stats),
    }
    if g.top_tokens:
        out["top_tokens"] = g.top_tokens
    return out


def space_summary(stats) -> dict:
    """Per-request SPACE figures: forward steps, tokens per step, candidates verified/accepted by position."""
    return {
        "num_steps": stats.num_steps,
        "mean_tokens_per_step": round(stats.mean_tokens_per_step, 4),
        "drafted_by_position": list(stats.drafted_by_position),
        "accepted_by_position": list(stats.accepted_by_position),
    }


def _headers(inputs: str, g: Generation) -> dict[str, str]:
    """TGI's `x-*` timing headers (milliseconds, `x-compute-time` in seconds)."""
    t = g.timings
    per_token = t.get("inference", 0.0) / max(1, len(g.tokens))
    return {
        "x-compute-type": os.environ.get("COMPUTE_TYPE", "cpu"),
        "x-compute-time": str(t.get("total", 0.0)),
        "x-compute-characters": str(len(inputs)),
        "x-total-time": str(int(t.get("total", 0.0) * 1000)),
        "x-validation-time": str(int(t.get("validation", 0.0) * 1000)),
        "x-queue-time": str(int(t.get("queue", 0.0) * 1000)),
        "x-inference-time": str(int(t.get("inference", 0.0) * 1000)),
        "x-time-per-token": str(int(per_token * 1000)),
        "x-prompt-tokens": str(g.input_length),
        "x-generated-tokens": str(len(g.tokens)),
    }


# ---- /generate_stream ------------------------------------------------------------------------


@router.post("/generate_stream")
async def generate_stream(request: Request) -> Response:
    """Server-sent events, one `StreamResponse` per token; the last carries `generated_text`."""
    service = service_of(request)
    req = await parse(request, GenerateRequest)
    return await _stream(service, req, return_full_text=bool(req.parameters.return_full_text))


async def _stream(service: Service, req: GenerateRequest, return_full_text: bool) -> Response:
    """Validation errors are a 4xx before the stream starts; errors after it, an error event."""
    started = time.monotonic()
    service.metrics.request_count.inc()
    service.acquire()
    try:
        p = req.parameters
        try:
            check_stream_request(1 if p.best_of is None else p.best_of, p.decoder_input_details)
        except ApiError:
            service.fail("validation")
            raise
        valid = await service.validate(req.inputs, p)
    except BaseException:
        service.release()
        raise
    prefix = req.inputs if return_full_text else ""
    events = _stream_events(service, valid, started, p.details, prefix)
    return sse_response(events, lambda err: err.body(), service.release)


async def _stream_events(service: Service, valid: ValidRequest, started: float, with_details: bool, prefix: str):
    index = 0
    async for ev in service.stream(valid, started):
        index += 1
        yield stream_response(ev, index, with_details, prefix)


def stream_response(ev: TokenEvent, index: int, with_details: bool, prefix: str) -> dict:
    """TGI's `StreamResponse`."""
    out = {"index": index, "token": ev.token.as_dict()}
    if ev.top_tokens:
        out["top_tokens"] = ev.top_tokens
    last = ev.finish_reason is not None
    out["generated_text"] = prefix + ev.generated_text if last else None
    out["details"] = None
    if last and with_details:
        out["details"] = {
            "finish_reason": ev.finish_reason,
            "generated_tokens": ev.generated_tokens,
            "seed": ev.seed,
            "input_length": ev.input_length,
        }
    return out


# ---- POST / ----------------------------------------------------------------------------------


@router.post("/")
async def compat_generate(request: Request) -> Response:
    """`stream: false` -> a one-element list of GenerateResponse; `stream: true` -> /generate_stream."""
    service = service_of(request)
    req = await parse(request, CompatGenerateRequest)
    full = True if req.parameters.return_full_text is None else req.parameters.return_full_text  # no pipeline tag
    if req.stream:
        return await _stream(service, req, return_full_text=full)
    return await _generate(request, service, req, return_full_text=full, as_list=True)


# ---- the rest --------------------------------------------------------------------------------


@router.post("/tokenize")
async def tokenize(request: Request) -> Response:
    """Token ids with their text and byte offsets in `inputs` (TGI's `TokenizeResponse`), off the event loop."""
    service = service_of(request)
    req = await parse(request, GenerateRequest)
    body = await asyncio.to_thread(service.tokenizers.tokenize, req.inputs, True, req.parameters.truncate)
    return Response(body, media_type="application/json")


@router.get("/info")
async def info(request: Request) -> Response:
    """TGI's `Info`, plus the speculation settings."""
    return JSONResponse(request.app.state.tgi.info())


@router.get("/health")
@router.get("/ping")
@router.get("/")
async def health(request: Request) -> Response:
    """200 once the model is loaded and the engine thread runs; 503 before and after."""
    service = request.app.state.tgi.service
    if service is None or not service.worker.is_alive:
        return unhealthy().response()
    return Response(status_code=200)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    return PlainTextResponse(request.app.state.tgi.metrics.render(), media_type="text/plain; version=0.0.4")
