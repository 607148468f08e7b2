"""The model side of the gRPC service: a tiny batch cache and one SPACE step per Prefill/Decode.

Protobuf requests come in (batches are built by `SpaceBatch.from_pb`), plain
dataclasses go out; the service converts them at the edge. One lock serialises
all engine and cache work, so gRPC may answer Health/Info from other threads.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch

from tgi_space.engine import Engine
from tgi_space.scheduler import plan_sequence
from tgi_space.space import SeqPlan
from tgi_space.server.batch import BatchContext, CapacityError, InvalidRequest, ShardRequest, SlotTable, SpaceBatch
from tgi_space.server.generation import Generation, Tokens
from tgi_space.watermark import Watermark



def _head(ids: list[int], n: int = 8) -> str:
    """A list of ids, cut after n."""
    return str(ids[:n])[:-1] + (", ...]" if len(ids) > n else "]")


log = logging.getLogger(__name__)

class BatchNotFound(KeyError):
    """A batch id the cache does not hold; becomes NOT_FOUND."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class ShardInfo:
    """What Info reports: the truth of this shard."""

    dtype: str
    device_type: str
    speculate: int
    block_size: int
    attention_impl: str
    requires_padding: bool = False
    support_chunking: bool = False
    use_prefix_caching: bool = False
    window_size: int | None = None


@dataclass
class WarmupResult:
    """Warmup's answer: cache capacity in tokens, and the input/total limits."""

    max_supported_total_tokens: int
    max_input_tokens: int
    max_total_tokens: int


GOVERNOR_LOG_EVERY = 1000  # steps between two log lines of what the planner has learnt


@dataclass
class StepResult:
    """Prefill/Decode's answer: one Generation per request, the batch to keep (None if all finished)."""

    generations: list[Generation]
    batch: SpaceBatch | None
    forward_ns: int
    decode_ns: int
    total_ns: int
    concat_ns: int | None = None


class Shard:
    """Runs router batches on the engine; the router owns the KV blocks, masks need none."""

    def __init__(self, engine: Engine, speculate: bool, watermark: Watermark, method: str = "space",
                 chunking: bool = False, prefix_caching: bool = False) -> None:
        self.engine = engine
        if speculate and method == "sdsat":
            engine.check_sdsat()  # at start-up: a checkpoint SDSAT cannot decode is refused, naming the field
        can = engine.k_max > 0 if method == "sdsat" else engine.planned or engine.k_max > 0
        self.ctx = BatchContext(engine, speculate and can, watermark, method=method, chunking=chunking,
                                prefix_caching=prefix_caching)
        self.max_prefill_tokens: int | None = None  # Warmup's: bounds the prompt tokens of one step when chunking
        self.cache: dict[int, SpaceBatch] = {}  # batch id -> batch; emptied by ClearCache
        self.lock = threading.Lock()

    @property
    def speculate(self) -> int:
        """Info.speculate: the longest path one step can accept (the router reserves that many extra slots)."""
        if not self.ctx.speculate:
            return 0
        if self.ctx.method == "sdsat":  # a verify pass accepts one path: k adaptive drafts, or suffix drafts
            return self.engine.sdsat.max_path
        return self.engine.config.space.max_tree_depth if self.engine.planned else self.engine.k_max

    def info(self) -> ShardInfo:
        """Static facts for the router."""
        cfg = self.engine.config
        return ShardInfo(
            dtype=str(self.engine.dtype),
            device_type=torch.device(cfg.device).type,
            speculate=self.speculate,
            block_size=cfg.block_size,
            attention_impl=cfg.attention_backend,
            support_chunking=self.ctx.chunking,
            use_prefix_caching=self.ctx.prefix_caching,
        )

    # ---- batch cache --------------------------------------------------------------------

    def clear(self, batch_id: int | None) -> None:
        """Drop one batch (unknown ids are fine) or, with None, every batch."""
        with self.lock:
            if batch_id is None:
                self.cache.clear()
            else:
                self.cache.pop(batch_id, None)

    def filter(self, batch_id: int, request_ids: list[int]) -> SpaceBatch:
        """Keep only request_ids of a cached batch, under the same id; every id must be in it."""
        with self.lock:
            if batch_id not in self.cache:
                raise BatchNotFound(f"Batch ID {batch_id} not found in cache")
            batch = self.cache[batch_id]
            if not request_ids:
                raise InvalidRequest(f"request_ids: empty for batch {batch_id}; an emptied batch is dropped with ClearCache")
            if len(set(request_ids)) != len(request_ids):
                raise InvalidRequest(f"request_ids: duplicate ids in {_head(request_ids)}")
            held = {r.request_id for r in batch.requests}
            unknown = [i for i in request_ids if i not in held]
            if unknown:
                raise InvalidRequest(
                    f"request_ids: {_head(unknown)} not in batch {batch_id} (it holds {_head(sorted(held))}); batch kept"
                )
            batch = batch.filter(request_ids)
            self.cache[batch_id] = batch
            return batch

    def _pop(self, batch_ids: list[int]) -> list[SpaceBatch]:
        """Take batches out of the cache; all present or nothing taken."""
        if len(set(batch_ids)) != len(batch_ids):
            raise InvalidRequest(f"batches: duplicate batch ids {batch_ids}")
        for i in batch_ids:
            if i not in self.cache:
                raise BatchNotFound(f"Batch ID {i} not found in cache")
        return [self.cache.pop(i) for i in batch_ids]

    # ---- RPC bodies ---------------------------------------------------------------------

    def warmup(self, pb_batch, max_input: int | None, max_total: int | None,
               max_prefill: int | None = None) -> WarmupResult:
        """A worst-case prefill of the router's warm-up batch on our own slots; nothing is kept."""
        if not pb_batch.requests:
            raise InvalidRequest("batch.requests: Warmup needs a batch with at least one request")
        with self.lock:
            self.cache.clear()
            self.max_prefill_tokens = max_prefill or None
            if self.engine.planned and self.ctx.speculate:  # probe t(rows, batch) before any traffic
                self._log_latency(self.engine.speculator)
            batch = SpaceBatch.from_pb_self_allocated(pb_batch, self.ctx)
            try:
                self._step(batch)
            except torch.cuda.OutOfMemoryError as err:
                num = sum(r.seq.num_prompt for r in batch.requests)
                raise CapacityError(
                    f"Not enough memory to handle {num} prefill tokens; lower --max-batch-prefill-tokens"
                ) from err
            prompt_tokens = sum(r.seq.num_prompt for r in batch.requests)
        capacity = self.ctx.num_slots
        max_total = max_total if max_total is not None else prompt_tokens
        max_input = max_input if max_input is not None else max_total - 1
        limit = self.engine.model_config.max_model_len
        if max_total > limit:
            raise InvalidRequest(f"max_total_tokens: {max_total} exceeds the model's context length {limit}")
        if max_total > capacity:
            raise CapacityError(
                f"max_total_tokens: {max_total} exceeds the KV cache ({capacity} tokens); "
                "lower --max-total-tokens or give the shard more cache (TGI_SPACE_KV_CACHE_BYTES)"
            )
        return WarmupResult(capacity, max_input, max_total)

    @staticmethod
    def _log_governor(speculator) -> None:
        """What the planner has learnt so far: measured tokens/s by batch bucket and kind, its cost factors."""
        info = speculator.info()
        rates = {k: {kind: round(r) for kind, r in v.items()} for k, v in info["tokens_per_s_by_batch"].items()}
        log.info("planner after %d steps: tokens/s by batch and kind %s; plain factor %s; row factor %s; "
                 "overhead per sequence %s ms; plain fallback %.2f", info["steps"], rates,
                 {b: round(f, 2) for b, f in info["plain_factor"].items()},
                 {b: round(f, 2) for b, f in info["marginal_factor"].items()},
                 {k: round(v, 3) for k, v in info["overhead_ms_per_sequence"].items()}, info["plain_fallback_rate"])

    @staticmethod
    def _log_latency(speculator) -> None:
        """Probe the planner's t(rows, batch) now and log it (and a mask group's own cost) once."""
        curve = speculator.latency().as_dict()
        text = "; ".join(f"batch {b}: " + ", ".join(f"t({n})={ms:.1f}" for n, ms in c.items()) for b, c in curve.items())
        log.info("planner latency probe (ms): %s; mask group step cost %.2f ms", text, 1000 * speculator.mask_step_cost)

    def prefill(self, pb_batch, cached_id: int | None = None) -> StepResult:
        """First step of a new batch: KV of the prompts, the first token, the first candidates. With chunking,
        `cached_id` names the running batch: it joins (under its own id) and takes its decode step in the same
        forward. If such a Prefill fails, the cached batch is dropped too: the router fails all its requests."""
        if cached_id is not None and not self.ctx.chunking:
            raise InvalidRequest("cached_batch: prefill chunking is off (Info.support_chunking = false; PREFILL_CHUNKING=0)")
        start = time.perf_counter_ns()
        self._close_gap()
        try:
            batch = SpaceBatch.from_pb(pb_batch, self.ctx)  # tokenizing and request checks: outside the lock
            with self.lock:
                self._check_bookkeeping(batch)  # the router's ids and slots, before anything changes
                if cached_id is not None:
                    batch = SpaceBatch.concatenate([*self._pop([cached_id]), batch])
                return self._run(batch, start, None)
        except Exception:
            if cached_id is not None:
                self.clear(cached_id)
            raise

    def _close_gap(self) -> None:
        """The planner's time outside the engine ends when a call arrives, not when its step is planned."""
        if self.engine.planned:
            with self.lock:
                self.engine.speculator.close_gap()

    def _check_bookkeeping(self, batch: SpaceBatch) -> None:
        """A new batch must not reuse a live batch id, a live request id, or a slot a live request owns."""
        if batch.batch_id in self.cache:
            raise InvalidRequest(f"batch.id: batch {batch.batch_id} is still cached; batch ids must be unique")
        owner = {r.request_id: b.batch_id for b in self.cache.values() for r in b.requests}
        seen: set[int] = set()
        for i, r in enumerate(batch.requests):
            if r.request_id in seen:
                raise InvalidRequest(f"batch.requests[{i}].id: request id {r.request_id} appears twice in the batch")
            if r.request_id in owner:
                raise InvalidRequest(
                    f"batch.requests[{i}].id: request id {r.request_id} is live in batch {owner[r.request_id]}"
                )
            seen.add(r.request_id)
        # With prefix caching, prompt slots may be shared (the router's radix allocator: read-only, the same K/V
        # bits); the slots after the prompt, which decoding writes, belong to one request alone.
        shared, exclusive = self._prompt_and_own_slots([r for b in self.cache.values() for r in b.requests])
        for i, r in enumerate(batch.requests):
            if torch.unique(r.slots).numel() != r.slots.numel():
                raise InvalidRequest(f"batch.requests[{i}].slots: request {r.request_id} lists a slot twice")
            prompt, own = self._prompt_and_own_slots([r])
            clash = torch.isin(r.slots, exclusive) | torch.isin(r.slots, own) & torch.isin(r.slots, shared)
            if bool(clash.any()):
                slot = int(r.slots[clash][0])
                raise InvalidRequest(
                    f"batch.requests[{i}].slots: slot {slot} of request {r.request_id} belongs to another live request"
                )
            shared, exclusive = torch.cat([shared, prompt]), torch.cat([exclusive, own])

    def _prompt_and_own_slots(self, requests: list[ShardRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots others may share, slots only their request may hold): with prefix caching the prompt's and the
        rest; without, nothing shared."""
        empty = torch.empty(0, dtype=torch.long)
        if not self.ctx.prefix_caching:
            return empty, torch.cat([r.slots for r in requests]) if requests else empty
        prompt = [r.slots[: r.seq.num_prompt] for r in requests]
        own = [r.slots[r.seq.num_prompt :] for r in requests]
        return (torch.cat(prompt), torch.cat(own)) if requests else (empty, empty)

    def decode(self, batch_ids: list[int]) -> StepResult:
        """One SPACE step over the concatenation of cached batches."""
        if not batch_ids:
            raise InvalidRequest("batches: Decode needs at least one cached batch")
        start = time.perf_counter_ns()
        self._close_gap()
        with self.lock:
            batches = self._pop(batch_ids)
            batch = SpaceBatch.concatenate(batches) if len(batches) > 1 else batches[0]
            concat_ns = time.perf_counter_ns() - start if len(batches) > 1 else None
            return self._run(batch, start, concat_ns)

    def _run(self, batch: SpaceBatch, start: int, concat_ns: int | None) -> StepResult:
        """Step, keep the batch if anything is left, time it."""
        generations, forward_ns = self._step(batch)
        if self.engine.planned and self.engine.num_steps % GOVERNOR_LOG_EVERY == 0:
            self._log_governor(self.engine.speculator)
        if len(batch):
            self.cache[batch.batch_id] = batch
        total = time.perf_counter_ns() - start
        return StepResult(generations, batch if len(batch) else None, forward_ns, total - forward_ns, total, concat_ns)

    # ---- the step -----------------------------------------------------------------------

    def _step(self, batch: SpaceBatch) -> tuple[list[Generation], int]:
        """Verify, emit and draft for every request; finished requests leave the batch. A request whose
        prompt is cut into chunks sends only a chunk, emits nothing and gets no Generation until its last."""
        live = batch.requests
        chunks = self._chunks(live)
        k = self._fixed_k(live)
        full = [(r.seq, plan_sequence(r.seq, k if r.seq.speculate else 0)) for r, c in zip(live, chunks) if c is None]
        speculated = iter(self.engine.speculate(full))  # planned rows; SDSAT requests: their draft or verify pass
        planned = [next(speculated) if c is None else (r.seq, _chunk_plan(r.seq, c)) for r, c in zip(live, chunks)]
        starts = [r.seq.num_cached if r.prefill_logprobs and r.seq.num_cached < r.seq.num_prompt else None
                  for r in live]
        start = time.perf_counter_ns()
        results = self.engine.execute(planned, SlotTable(live), keep_hidden=any(s is not None for s in starts))
        forward_ns = time.perf_counter_ns() - start
        generations = []
        for i, (request, (_, emitted)) in enumerate(zip(live, results)):
            if starts[i] is not None:
                self._gather_prompt_logprobs(i, request, starts[i], chunks[i])
            if chunks[i] is None:
                prefill = self._prompt_tokens(request) if starts[i] is not None else None
                generations.append(request.generation(emitted, prefill))
        self.engine.last_step = None
        batch.requests = [r for r in live if not r.seq.is_finished]
        return generations, forward_ns

    def _fixed_k(self, live: list[ShardRequest]) -> int:
        """Candidates per speculating sequence in a base plan: 0 when planned (the planner adds what is worth
        sending to the uncached tokens), else the paper's fixed layout's k for this batch."""
        if self.engine.planned:
            return 0
        return self.engine.config.space.choose_k(sum(r.seq.speculate for r in live), 0, self.engine.k_max)

    def _chunks(self, live: list[ShardRequest]) -> list[int | None]:
        """Prompt tokens each request computes this step when that is not the rest of its prompt (else None):
        on a request's first step the router's chunk_len; on the next ones what is left of max_prefill_tokens
        after one token per other request, oldest request first (as TGI's server)."""
        budget = (self.max_prefill_tokens or 0) - (len(live) - 1)
        out: list[int | None] = []
        for r in live:
            seq = r.seq
            left = seq.num_prompt - seq.num_cached
            if seq.num_cached == r.cache_len:  # the router's choice: a chunk, or the whole (uncached) prompt
                n = r.chunk_len or left
            elif left > 0 and self.max_prefill_tokens:
                n = max(1, min(left, budget))
                budget -= n
            else:
                n = left
            out.append(n if 0 < n < left else None)
        return out

    def _gather_prompt_logprobs(self, index: int, request: ShardRequest, start: int, chunk: int | None) -> None:
        """Log-probabilities of the prompt tokens that follow this step's rows of it (rows start..start+n-1)."""
        seq = request.seq
        end = seq.num_prompt if chunk is None else start + chunk + 1  # a chunk's last row predicts the next chunk
        request.prompt_logprobs += self.engine.chain_logprobs(index, seq.tokens[start + 1 : min(end, seq.num_prompt)])

    @staticmethod
    def _prompt_tokens(request: ShardRequest) -> Tokens:
        """Prompt ids with the log-probability of each given the previous ones (first: NaN)."""
        seq, tokenizer = request.seq, request.seq_tokenizer
        ids = seq.tokens[: seq.num_prompt]
        return Tokens(ids, list(request.prompt_logprobs), [tokenizer.token_text(i) for i in ids],
                      [tokenizer.is_special(i) for i in ids])


def _chunk_plan(seq, n: int) -> SeqPlan:
    """The next n prompt tokens of seq, nothing else: K/V written, no logits, nothing emitted or drafted."""
    chain = seq.tokens[seq.num_cached : seq.num_cached + n]
    return SeqPlan(chain=chain, num_candidates=0, anchors=[], group_size=0, num_cached=seq.num_cached, partial=True)
