"""The OpenAI-compatible routes of TGI's router: `/v1/completions`, `/v1/chat/completions`, `/v1/models`."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from tgi_space import __version__
from tgi_space.http.encoding import JSONResponse, dumps
from tgi_space.http.errors import ApiError, validation_error
from tgi_space.http.routes_tgi import parse, service_of
from tgi_space.http.schemas import ChatRequest, CompletionRequest, GenerateParameters
from tgi_space.http.service import Service, TokenEvent, unless_disconnected
from tgi_space.http.sse import sse_response
from tgi_space.http.validation import ValidRequest

router = APIRouter()
FINGERPRINT = f"{__version__}-native"  # TGI: "{version}-{docker_label or 'native'}"


def openai_finish_reason(reason: str) -> str:
    """TGI's `FinishReason::format(true)`: `eos_token` reads `stop`."""
    return "stop" if reason == "eos_token" else reason


def check_model(request: Request, model: str | None) -> str:
    """The model id to echo. Any `model` is accepted, as TGI does: this server serves one model."""
    return request.app.state.tgi.model_id


def _usage(prompt: int, completion: int, cached: int = 0) -> dict:
    """OpenAI's usage; `cached`: prompt tokens read from the prefix cache (prompt_tokens_details.cached_tokens)."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _cached(stats) -> int:
    return stats.cached_prompt_tokens if stats is not None else 0


# ---- /v1/completions -------------------------------------------------------------------------


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    """Text completions for one or more prompts (at most `max_client_batch_size`)."""
    service = service_of(request)
    req = await parse(request, CompletionRequest)
    service.metrics.request_count.inc()
    model_id = check_model(request, req.model)
    if req.suffix is not None:
        service.fail("validation")
        raise ApiError(422, "Suffix is not supported and can be achieved by preprocessing the prompt.", "suffix not supported")
    limit = request.app.state.tgi.settings.max_client_batch_size
    if len(req.prompt) > limit:
        service.fail("validation")
        raise ApiError(422, f"Number of prompts exceeds the maximum allowed batch size of {limit}", "batch size exceeded")
    greedy = req.temperature == 0.0
    params = GenerateParameters(
        temperature=None if greedy else req.temperature, repetition_penalty=req.repetition_penalty,
        frequency_penalty=req.frequency_penalty, top_p=req.top_p, do_sample=not greedy,
        max_new_tokens=req.max_tokens, stop=req.stop or [], seed=req.seed, details=True,
    )
    started = time.monotonic()
    service.acquire()
    try:
        valids = [await service.validate(p, params) for p in req.prompt]
    except BaseException:
        service.release()
        raise
    if req.stream:
        return sse_response(_completion_chunks(service, valids, started, model_id), _openai_error, service.release)
    try:
        runs = await unless_disconnected(request, asyncio.gather(*(service.generate(v, started) for v in valids)))
    finally:
        service.release()
    choices = [
        {"index": i, "text": g.text, "logprobs": None, "finish_reason": openai_finish_reason(g.finish_reason)}
        for i, g in enumerate(runs)
    ]
    usage = _usage(sum(g.input_length for g in runs), sum(len(g.tokens) for g in runs), sum(_cached(g.stats) for g in runs))
    return JSONResponse({
        "object": "text_completion", "id": "", "created": int(time.time()), "model": model_id,
        "system_fingerprint": FINGERPRINT, "choices": choices, "usage": usage,
    })


async def _completion_chunks(service: Service, valids: list[ValidRequest], started: float, model_id: str):
    """Chunks of every prompt as they come (interleaved, `index` tells them apart), then `[DONE]`."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, valid: ValidRequest) -> None:
        try:
            async for ev in service.stream(valid, started):
                await queue.put((index, ev))
        except ApiError as err:
            await queue.put((index, err))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, v)) for i, v in enumerate(valids)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, ApiError):
                yield _openai_error(item)
            else:
                yield _completion_chunk(index, item, model_id)
        yield "[DONE]"
    finally:
        for task in tasks:
            task.cancel()


def _completion_chunk(index: int, ev: TokenEvent, model_id: str) -> dict:
    """TGI's `Chunk`, or `CompletionFinal` (with usage) on a prompt's last token."""
    last = ev.finish_reason is not None
    choice = {"index": index, "text": ev.token.text, "logprobs": None, "finish_reason": ev.finish_reason if last else ""}
    out = {"object": "text_completion", "id": "", "created": int(time.time()), "model": model_id,
           "system_fingerprint": FINGERPRINT, "choices": [choice]}
    if last:
        out["usage"] = _usage(ev.input_length, ev.generated_tokens, _cached(ev.stats))
    return out


def _openai_error(err: ApiError) -> dict:
    return err.openai_event()


# ---- /v1/chat/completions --------------------------------------------------------------------


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    """Chat: the tokenizer's chat template, then a generation (TGI's `ChatCompletion` / chunks)."""
    service = service_of(request)
    req = await parse(request, ChatRequest)
    service.metrics.request_count.inc()
    model_id = check_model(request, req.model)
    unsupported = unsupported_chat_fields(req)
    if unsupported:
        service.fail("validation")
        raise validation_error(unsupported)
    prompt = await asyncio.to_thread(request.app.state.tgi.chat_template.render, req.messages)
    greedy = req.temperature == 0.0
    params = GenerateParameters(
        temperature=None if greedy else req.temperature,
        repetition_penalty=None if req.presence_penalty is None else req.presence_penalty + 2.0,  # as TGI
        frequency_penalty=req.frequency_penalty, top_p=req.top_p, do_sample=not greedy,
        max_new_tokens=req.max_new_tokens, stop=req.stop or [], seed=req.seed, details=True,
        top_n_tokens=req.top_logprobs,
    )
    started = time.monotonic()
    service.acquire()
    try:
        valid = await service.validate(prompt, params, add_special_tokens=False)
    except BaseException:
        service.release()
        raise
    logprobs = bool(req.logprobs)
    if req.stream:
        usage = req.stream_options is not None and req.stream_options.include_usage
        chunks = _chat_chunks(service, valid, started, model_id, logprobs, usage)
        return sse_response(chunks, _openai_error, service.release)
    try:
        g = await unless_disconnected(request, service.generate(valid, started))
    finally:
        service.release()
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": g.text},
        "logprobs": {"content": [_logprob(t.text, t.logprob, top) for t, top in zip(g.tokens, g.top_tokens or [[]] * len(g.tokens))]} if logprobs else None,
        "finish_reason": openai_finish_reason(g.finish_reason),
    }
    return JSONResponse({
        "object": "chat.completion", "id": "", "created": int(time.time()), "model": model_id,
        "system_fingerprint": FINGERPRINT, "choices": [choice], "usage": _usage(g.input_length, len(g.tokens), _cached(g.stats)),
    })


def unsupported_chat_fields(req: ChatRequest) -> str | None:
    """What a chat request asks that needs grammar-constrained decoding, named; None if nothing."""
    sent = [name for name in ("tools", "tool_choice", "response_format") if getattr(req, name) not in (None, [], "none")]
    if not sent:
        return None
    fields = ", ".join(f"`{name}`" for name in sent)
    return (f"{fields} {'is' if len(sent) == 1 else 'are'} not supported by tgi-space: tool calls and response formats "
            "need grammar-constrained decoding, which this server does not implement; send the request without "
            f"{'it' if len(sent) == 1 else 'them'}")


def _logprob(text: str, logprob: float, top: list[dict]) -> dict:
    return {"token": text, "logprob": logprob, "top_logprobs": [{"token": t["text"], "logprob": t["logprob"]} for t in top]}


async def _chat_chunks(service: Service, valid: ValidRequest, started: float, model_id: str, logprobs: bool, usage: bool):
    """One `chat.completion.chunk` per token (special tokens send empty content), usage chunk, `[DONE]`."""
    async for ev in service.stream(valid, started):
        last = ev.finish_reason is not None
        delta = {"role": "assistant", "content": "" if ev.token.special else ev.token.text}
        choice = {
            "index": 0, "delta": delta,
            "logprobs": {"content": [_logprob(ev.token.text, ev.token.logprob, ev.top_tokens)]} if logprobs else None,
            "finish_reason": openai_finish_reason(ev.finish_reason) if last else None,
        }
        yield _chunk(model_id, [choice], None)
        if last and usage:
            yield _chunk(model_id, [], _usage(ev.input_length, ev.generated_tokens, _cached(ev.stats)))
    yield "[DONE]"


def _chunk(model_id: str, choices: list[dict], usage: dict | None) -> dict:
    return {"object": "chat.completion.chunk", "id": "", "created": int(time.time()), "model": model_id,
            "system_fingerprint": FINGERPRINT, "choices": choices, "usage": usage}


@router.post("/chat_tokenize")
async def chat_tokenize(request: Request) -> Response:
    """The chat template applied and tokenized (TGI's `ChatTokenizeResponse`)."""
    service = service_of(request)
    req = await parse(request, ChatRequest)
    service.metrics.request_count.inc()
    template = request.app.state.tgi.chat_template
    text = await asyncio.to_thread(template.render, req.messages)
    tokens = await asyncio.to_thread(service.tokenizers.tokenize, text, False, None)
    body = b'{"tokenize_response":' + tokens + b',"templated_text":' + dumps(text).encode() + b"}"
    return Response(body, media_type="application/json")


# ---- /v1/models ------------------------------------------------------------------------------


@router.get("/v1/models")
async def models(request: Request) -> Response:
    """The one served model (TGI's `ModelsInfo`)."""
    model_id = request.app.state.tgi.model_id
    return JSONResponse({"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": model_id}]})
