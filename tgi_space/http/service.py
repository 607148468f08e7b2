"""What every route shares: the concurrency permits, validation with metrics, and running a request."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field

from tgi_space.engine import Engine
from tgi_space.http.detok import DecodeStream
from tgi_space.http.errors import ApiError, generation_error, overloaded, unhealthy
from tgi_space.http.metrics import Metrics
from tgi_space.http.schemas import GenerateParameters
from tgi_space.http.tokenizing import TokenizerPool
from tgi_space.http.validation import Limits, ValidRequest, validate
from tgi_space.http.worker import EngineWorker
from tgi_space.sequence import SeqStats


@dataclass
class TokenOut:
    """One generated token as the routes show it (TGI's `Token` plus `space_step`)."""

    id: int
    text: str
    logprob: float
    special: bool
    space_step: int  # request-relative index of the SPACE step that emitted it (same value: same forward)

    def as_dict(self) -> dict:
        return {"id": self.id, "text": self.text, "logprob": self.logprob, "special": self.special, "space_step": self.space_step}


@dataclass
class TokenEvent:
    """A token, its top alternatives, and on the last token the request's outcome."""

    token: TokenOut
    top_tokens: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    generated_text: str | None = None
    generated_tokens: int = 0
    seed: int | None = None
    input_length: int = 0
    stats: SeqStats | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds: total, validation, queue, inference


@dataclass
class Generation:
    """A whole non-streamed generation."""

    text: str
    tokens: list[TokenOut]
    top_tokens: list[list[dict]]
    finish_reason: str
    seed: int | None
    input_length: int
    stats: SeqStats
    timings: dict[str, float]


class Service:
    """Owns the worker's front side: permits, validation, token streams."""

    def __init__(
        self, engine: Engine, worker: EngineWorker, metrics: Metrics, limits: Limits, speculate: str, max_concurrent_requests: int,
        validation_workers: int = 2,
    ) -> None:
        self.engine = engine
        self.worker = worker
        self.metrics = metrics
        self.limits = limits
        self.speculate = speculate
        self.max_concurrent_requests = max_concurrent_requests
        self.in_flight = 0  # requests holding a permit; event loop only
        self.tokenizers = TokenizerPool(engine.tokenizer, engine.config.model_dir, validation_workers)

    def acquire(self) -> None:
        """Take one of `max_concurrent_requests` permits, or 429 (TGI's semaphore); pair with `release`."""
        if not self.worker.is_alive:
            raise unhealthy()
        if self.in_flight >= self.max_concurrent_requests:
            self.metrics.request_failure.labels(err="overloaded").inc()
            raise overloaded()
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1

    @contextlib.contextmanager
    def permit(self):
        """A permit held for the block (non-streaming routes)."""
        self.acquire()
        try:
            yield
        finally:
            self.release()

    async def validate(self, inputs: str, params: GenerateParameters, add_special_tokens: bool = True) -> ValidRequest:
        """TGI's validation, counted as a `validation` failure when it fails; tokenizes on a worker thread."""
        try:
            valid = await asyncio.to_thread(
                validate, self.engine, self.limits, inputs, params, add_special_tokens, self.tokenizers
            )
        except ApiError:
            self.metrics.request_failure.labels(err="validation").inc()
            raise
        self.metrics.input_length.observe(len(valid.input_ids))
        self.metrics.max_new_tokens.observe(valid.params.max_new_tokens)
        return valid

    def fail(self, err: str) -> None:
        """Count a request that failed after validation."""
        self.metrics.request_failure.labels(err=err).inc()

    async def stream(self, valid: ValidRequest, started: float, record: bool = True) -> AsyncIterator[TokenEvent]:
        """Tokens of one request as the engine emits them; cancels the request if the consumer leaves.

        `record=False` leaves the request metrics alone (the extra sequences of `best_of`).
        """
        tokenizer = self.engine.tokenizer
        handle = self.worker.submit(valid.input_ids, valid.params, self.speculate)
        decoder = DecodeStream(tokenizer, valid.input_ids)
        steps: dict[int, int] = {}  # engine step index -> request-relative step
        count = 0
        validated = time.monotonic()
        try:
            async for out in handle:
                if out.error is not None:
                    self.fail("generation")
                    raise generation_error(out.error)
                for i, info in enumerate(out.tokens):
                    count += 1
                    space_step = steps.setdefault(info.step, len(steps))
                    token = TokenOut(info.token_id, decoder.step(info.token_id), info.logprob, tokenizer.is_special(info.token_id), space_step)
                    event = TokenEvent(token, [self._top(t, lp) for t, lp in info.top])
                    if out.finish_reason is not None and i == len(out.tokens) - 1:
                        self._finish(event, handle, valid, count, out.stats, started, validated, record)
                    yield event
        finally:
            if not handle.done:  # the consumer left mid-generation: free the request's blocks now
                self.fail("cancelled")
                self.worker.cancel(handle)

    def _top(self, token_id: int, logprob: float) -> dict:
        tok = self.engine.tokenizer
        return {"id": token_id, "text": tok.token_text(token_id), "logprob": logprob, "special": tok.is_special(token_id)}

    def _finish(
        self, event: TokenEvent, handle, valid: ValidRequest, count: int, stats: SeqStats, started: float, validated: float, record: bool
    ) -> None:
        """Fill the last event and record TGI's per-request metrics."""
        seq = handle.seq
        event.finish_reason = seq.finish_reason
        event.generated_text = self.engine.tokenizer.decode(seq.output_ids)
        event.generated_tokens = count
        event.seed = valid.seed
        event.input_length = len(valid.input_ids)
        event.stats = stats
        now = time.monotonic()
        start = handle.started_at or now
        event.timings = {"total": now - started, "validation": validated - started, "queue": max(0.0, start - handle.queued_at), "inference": now - start}
        if not record:
            return
        m = self.metrics
        m.request_success.inc()
        m.request_duration.observe(now - started)
        m.validation_duration.observe(validated - started)
        m.queue_duration.observe(max(0.0, start - handle.queued_at))
        m.inference_duration.observe(now - start)
        m.time_per_token.observe((now - start) / max(1, count))
        m.generated_tokens.observe(count)

    async def generate(self, valid: ValidRequest, started: float, record: bool = True) -> Generation:
        """A whole generation (the non-streaming routes)."""
        tokens, tops, last = [], [], None
        async for event in self.stream(valid, started, record):
            tokens.append(event.token)
            tops.append(event.top_tokens)
            last = event
        if last is None or last.finish_reason is None:
            self.fail("incomplete")
            raise ApiError(500, "Incomplete generation", "incomplete_generation")
        return Generation(
            text=last.generated_text,
            tokens=tokens,
            top_tokens=tops if valid.params.top_n_tokens else [],
            finish_reason=last.finish_reason,
            seed=last.seed,
            input_length=last.input_length,
            stats=last.stats,
            timings=last.timings,
        )


class ClientGone(Exception):
    """The client of a non-streaming request disconnected; its generation was cancelled."""


async def unless_disconnected(request, work: Awaitable, poll_s: float = 0.1):
    """Await `work`, cancelling it (and so freeing its KV blocks) if the HTTP client goes away first."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=poll_s)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            raise ClientGone()
