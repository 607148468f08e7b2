"""The continuous-batching loop: one thread owns the engine; requests and tokens cross through queues.

Lifecycle of a request: `submit` (event loop) -> command queue -> `add_request` (engine
thread) -> one `StepOutput` per engine step it took part in, pushed onto the request's
asyncio queue with `call_soon_threadsafe` -> the last one has `finish_reason` set.
`cancel` (client gone) queues an abort; the engine thread frees the request's blocks.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from tgi_space.engine import Engine
from tgi_space.http.metrics import Metrics
from tgi_space.sampling import SamplingParams
from tgi_space.sequence import Sequence, SeqStats, TokenInfo

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """What one request got from one engine step (or the error that ended it)."""

    tokens: list[TokenInfo]
    finish_reason: str | None = None
    stats: SeqStats | None = None  # set on the last output
    error: str | None = None


@dataclass
class RequestHandle:
    """The event-loop side of a request in flight."""

    prompt_ids: list[int]
    params: SamplingParams
    speculate: str
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)
    queued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None  # first engine step that included it
    seq: Sequence | None = None  # set by the engine thread
    done: bool = False

    def push(self, output: StepOutput) -> None:
        """Called from the engine thread."""
        if self.started_at is None:
            self.started_at = time.monotonic()
        self.loop.call_soon_threadsafe(self.outputs.put_nowait, output)

    async def __aiter__(self):
        while not self.done:
            out = await self.outputs.get()
            self.done = out.finish_reason is not None or out.error is not None
            yield out


class EngineWorker:
    """Runs `engine.step()` in a loop on a dedicated thread while any request is in flight."""

    def __init__(self, engine: Engine, metrics: Metrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.handles: dict[int, RequestHandle] = {}  # seq id -> handle; engine thread only
        self.thread = threading.Thread(target=self._run, name="tgi-space-engine", daemon=True)
        self.is_stopping = False
        self.error: BaseException | None = None
        metrics.kv_total_blocks.set(engine.block_manager.num_blocks)
        metrics.kv_free_blocks.set(engine.block_manager.num_free_blocks)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Finish the thread after its current step; requests still in flight get an error."""
        self.is_stopping = True
        self.commands.put(("stop", None))
        self.thread.join(timeout=30)

    @property
    def is_alive(self) -> bool:
        return self.thread.is_alive() and not self.is_stopping

    def submit(self, prompt_ids: list[int], params: SamplingParams, speculate: str) -> RequestHandle:
        """Queue a validated request; iterate the handle for its outputs."""
        handle = RequestHandle(prompt_ids, params, speculate, asyncio.get_running_loop())
        self.commands.put(("add", handle))
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        """Abort a request whose client went away (no-op once finished)."""
        if not handle.done:
            handle.done = True
            self.commands.put(("abort", handle))

    # ---- engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self.is_stopping:
                self._drain(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished() and not self.is_stopping:
                    self._step()
        except BaseException as err:  # the thread must not die silently: /health turns 503
            log.exception("engine thread died")
            self.error = err
        finally:
            for handle in list(self.handles.values()):
                handle.push(StepOutput([], error="the engine stopped"))
            self.handles.clear()

    def _drain(self, block: bool) -> None:
        """Apply queued commands; wait for one when the engine is idle."""
        try:
            command = self.commands.get(timeout=0.5) if block else self.commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(*command)
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, kind: str, handle: RequestHandle | None) -> None:
        if kind == "add":
            try:
                handle.seq = self.engine.add_request(handle.prompt_ids, handle.params, handle.speculate)
            except ValueError as err:
                handle.push(StepOutput([], error=str(err)))
                return
            self.handles[handle.seq.seq_id] = handle
        elif kind == "abort" and handle.seq is not None and handle.seq.seq_id in self.handles:
            self.engine.abort(handle.seq)
            del self.handles[handle.seq.seq_id]
        self._update_gauges()

    def _step(self) -> None:
        """One engine step; results go to their handles, a failing step fails its requests only."""
        scheduler = self.engine.scheduler
        admitted = bool(scheduler.waiting) or any(len(s.tokens) - s.num_cached > 1 for s in scheduler.running)
        method = "prefill" if admitted else "decode"
        self.metrics.batch_inference_count.labels(method=method).inc()
        before = {sid: _position_counts(h.seq.stats) for sid, h in self.handles.items()}
        start = time.perf_counter()
        try:
            results = self.engine.step()
        except Exception as err:  # noqa: BLE001 - reported to every request in the batch
            log.exception("engine step failed")
            self._fail_all(f"{type(err).__name__}: {err}")
            return
        self.metrics.batch_inference_duration.labels(method=method).observe(time.perf_counter() - start)
        self.metrics.batch_inference_success.labels(method=method).inc()
        self.metrics.current_k.set(scheduler.last_k)
        if self.engine.planned:
            self.metrics.record_speculation(self.engine.speculator.stats)
        self.metrics.batch_next_size.observe(len(results))
        for seq, tokens in results:
            if tokens or seq.is_finished or seq.error:  # (a prompt chunk: nothing to say yet)
                self._publish(seq, tokens, before.get(seq.seq_id, ([], [])))
        self._update_gauges()

    def _publish(self, seq: Sequence, tokens: list[TokenInfo], before: tuple[list[int], list[int]]) -> None:
        handle = self.handles.get(seq.seq_id)
        drafted, accepted = _position_counts(seq.stats)
        self.metrics.record_step(len(tokens), _diff(drafted, before[0]), _diff(accepted, before[1]))
        if handle is None:
            return
        error = getattr(seq, "error", None)  # set by the engine when this request alone failed in the step
        if error:
            del self.handles[seq.seq_id]
            self.metrics.record_request_stats(seq.stats)
            handle.push(StepOutput(tokens, error=error))
            return
        finished = seq.finish_reason if seq.is_finished else None
        if finished:
            del self.handles[seq.seq_id]
            self.metrics.record_request_stats(seq.stats)
        handle.push(StepOutput(tokens, finished, seq.stats if finished else None))

    def _fail_all(self, message: str) -> None:
        for handle in list(self.handles.values()):
            self.engine.abort(handle.seq)
            handle.push(StepOutput([], error=message))
        self.handles.clear()
        self._update_gauges()

    def _update_gauges(self) -> None:
        scheduler = self.engine.scheduler
        self.metrics.batch_size.set(len(scheduler.running))
        self.metrics.queue_size.set(len(scheduler.waiting))
        blocks = self.engine.block_manager
        self.metrics.kv_free_blocks.set(blocks.num_free_blocks)
        self.metrics.prefix_cached_blocks.set(blocks.num_cached_blocks)
        self.metrics.prefix_cached_tokens.set(blocks.cached_tokens_served)


def _position_counts(stats: SeqStats) -> tuple[list[int], list[int]]:
    return list(stats.drafted_by_position), list(stats.accepted_by_position)


def _diff(after: list[int], before: list[int]) -> list[int]:
    return [a - (before[i] if i < len(before) else 0) for i, a in enumerate(after)]
