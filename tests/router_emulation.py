"""A Python stand-in for TGI's v3 router, driving a shard over its unix socket.

It does what `backends/v3/src` does to a shard (see docs/tgi-protocol.md):
ServiceDiscovery, ClearCache, Info, Warmup with the router's filler batch, then
continuous batching with its own block allocator (block 0 reserved,
`input_length + max_new_tokens + speculate - 1` slots per request): Prefill a
new batch, Decode([running, new]), FilterBatch / ClearCache when requests end or
are cancelled. It also checks what would make the real router panic (unknown
request ids, empty or ragged token lists).

Admission while a batch runs follows `batching_task`. Without chunking (the
shard's Info.support_chunking false): queued requests join only when at least
floor(waiting_served_ratio x running) are queued, or when max_waiting_tokens
Decode calls have passed since the last admission. TGI's launcher defaults are
1.2 and 20 (`TGI_ADMISSION`); the emulation's own default (0, 0) admits at
once, which the protocol tests use. With chunking, whatever is queued joins at
every step within what max_prefill_tokens leaves after the running batch's
current_tokens: Prefill(new batch, cached_batch=running) runs the new prompts
and the running batch's step in one call (then Decode, as every loop), and a
prompt over the budget is cut (chunk_len).
"""

from __future__ import annotations

import base64
import itertools
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from tokenizers import Tokenizer

from tgi_space.server.protogen import load_pb

pb2, pb2_grpc = load_pb()

HEALTH_ID = 2**64 - 1
TGI_ADMISSION = {"waiting_served_ratio": 1.2, "max_waiting_tokens": 20}  # the launcher's defaults
# Stands in for the JPEG the router attaches to the first warm-up request (SOI ... EOI; a text model skips it).
WARMUP_IMAGE = b"\xff\xd8\xff\xe0" + bytes(64) + b"\xff\xd9"


class RouterPanic(AssertionError):
    """Something the real router would `expect`/`unwrap` on and crash."""


@dataclass
class EmuRequest:
    """A user request as the router would queue it."""

    prompt: str
    max_new_tokens: int = 16
    arrival: int = 0  # loop tick at which the request is queued
    stop_sequences: list[str] = field(default_factory=list)
    parameters: dict = field(default_factory=dict)  # NextTokenChooserParameters overrides
    ignore_eos: bool = False
    top_n_tokens: int = 0
    prefill_logprobs: bool = False
    truncate: int | None = None  # default: max_input_tokens
    cancel_after: int | None = None  # the client goes away after this many tokens
    add_special_tokens: bool = True


@dataclass
class EmuResult:
    """Everything the router streamed back for one request."""

    token_ids: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    is_special: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tokens_per_generation: list[int] = field(default_factory=list)
    top_tokens: list[list[int]] = field(default_factory=list)
    prefill_tokens: object | None = None  # generate.v3.Tokens
    generated_text: object | None = None  # generate.v3.GeneratedText
    cancelled: bool = False
    error: str | None = None


@dataclass
class _Entry:
    request: EmuRequest
    result: EmuResult
    blocks: list[int]
    prompt_ids: list[int] | None = None  # prefix caching: the prompt whose full blocks may be kept when it ends
    shared: int = 0  # prefix caching: how many of `blocks` (the first) were read from the cache


class BlockAllocator:
    """The router's allocator: blocks 1..n-1 (block 0 is the health check's), slots block-major."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.free_blocks = list(range(1, num_blocks))
        self.num_blocks = num_blocks

    def allocate(self, tokens: int) -> tuple[list[int], list[int]] | None:
        """(blocks, slots) for `tokens` positions, or None when the cache is full."""
        needed = -(-tokens // self.block_size)
        if needed > len(self.free_blocks):
            return None
        blocks = [self.free_blocks.pop() for _ in range(needed)]  # deliberately not contiguous
        slots = [b * self.block_size + i for b in blocks for i in range(self.block_size)][:tokens]
        return blocks, slots

    def free(self, blocks: list[int]) -> None:
        self.free_blocks.extend(blocks)

    # The prefix-caching interface (PrefixAllocator): without a cache nothing is read, kept or matched.
    def allocate_prompt(self, tokens: int, prompt_ids: list[int] | None
                        ) -> tuple[list[int], list[int], int, int] | None:
        """(blocks, slots, cache_len, blocks read from the cache) for `tokens` positions; None when full."""
        allocation = self.allocate(tokens)
        return None if allocation is None else (*allocation, 0, 0)

    def cached_len(self, prompt_ids: list[int]) -> int:
        return 0

    def release(self, blocks: list[int], shared: int, prompt_ids: list[int] | None, keep: bool) -> None:
        self.free(blocks)


@dataclass
class _Prefix:
    """A cached full block of some prompt: its block id, the live requests reading it, when it was last used."""

    block: int
    readers: int = 0
    children: int = 0  # cached blocks that extend this prefix (a node is evicted only once it has none)
    used: int = 0


class PrefixAllocator(BlockAllocator):
    """The router's allocator with prefix caching (Info.use_prefix_caching, `radix.rs`): the full blocks of ended
    prompts stay cached, keyed by the token prefix they end; a new request reads the longest run of them that its
    prompt starts with (cache_len = its tokens, less one when that is the whole prompt, so that one token is
    computed) and gets fresh blocks for the rest. Unread cached blocks are evicted, least recently used first,
    when the free list runs short. Requests with prefill_logprobs neither match nor are kept (as upstream)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        super().__init__(num_blocks, block_size)
        self.cached: dict[tuple[int, ...], _Prefix] = {}
        self.clock = itertools.count(1)

    def allocate_prompt(self, tokens: int, prompt_ids: list[int] | None
                        ) -> tuple[list[int], list[int], int, int] | None:
        """(blocks, slots, cache_len, blocks read from the cache) for `tokens` positions; None when the cache is
        full even after evicting."""
        matched = self._match(prompt_ids or [])
        for node in matched:
            node.readers += 1
        needed = -(-tokens // self.block_size) - len(matched)
        while needed > len(self.free_blocks) and self._evict():
            pass
        if needed > len(self.free_blocks):
            self._unread(matched)
            return None
        blocks = [n.block for n in matched] + [self.free_blocks.pop() for _ in range(needed)]
        slots = [b * self.block_size + i for b in blocks for i in range(self.block_size)][:tokens]
        return blocks, slots, self.cached_len(prompt_ids or []), len(matched)

    def cached_len(self, prompt_ids: list[int]) -> int:
        """Prompt tokens whose K/V the cache holds, less one when that is all of them (one is always computed)."""
        return max(0, min(len(self._match(prompt_ids)) * self.block_size, len(prompt_ids) - 1))

    def release(self, blocks: list[int], shared: int, prompt_ids: list[int] | None, keep: bool) -> None:
        """A request ended: its first `shared` blocks (read from the cache) lose a reader; with `keep` (its prompt's
        K/V were all computed) its own full prompt blocks are cached, the rest freed."""
        self._unread(self._match(prompt_ids or [])[:shared])
        kept = set()
        full = len(prompt_ids or []) // self.block_size if keep else 0
        for i in range(shared, full):
            key = tuple(prompt_ids[: (i + 1) * self.block_size])
            if key in self.cached:  # another request cached the same prefix meanwhile: ours is a duplicate
                continue
            self.cached[key] = _Prefix(blocks[i], used=next(self.clock))
            if i:
                self.cached[key[: -self.block_size]].children += 1
            kept.add(blocks[i])
        self.free([b for b in blocks[shared:] if b not in kept])

    def _match(self, prompt_ids: list[int]) -> list[_Prefix]:
        out = []
        for i in range(len(prompt_ids) // self.block_size):
            node = self.cached.get(tuple(prompt_ids[: (i + 1) * self.block_size]))
            if node is None:
                break
            out.append(node)
        return out

    def _unread(self, nodes: list[_Prefix]) -> None:
        for node in nodes:
            node.readers -= 1
            node.used = next(self.clock)

    def _evict(self) -> bool:
        """Free the least recently used cached block that nobody reads and nothing extends; False if none."""
        leaves = [(n.used, key) for key, n in self.cached.items() if not n.readers and not n.children]
        if not leaves:
            return False
        key = min(leaves)[1]
        self.free_blocks.append(self.cached.pop(key).block)
        if len(key) > self.block_size:
            self.cached[key[: -self.block_size]].children -= 1
        return True


def _cacheable(req: EmuRequest, ids: list[int]) -> list[int] | None:
    """The prompt ids a prefix cache may match and keep; None for a request with prefill_logprobs (as upstream)."""
    return None if req.prefill_logprobs else ids


class RouterEmulation:
    """Connects to `unix://{socket_path}` and behaves like the router towards it."""

    def __init__(self, socket_path: str, tokenizer_path: str, max_input_tokens: int = 64,
                 max_total_tokens: int = 128, max_prefill_tokens: int = 256, max_batch_size: int = 16,
                 waiting_served_ratio: float = 0.0, max_waiting_tokens: int = 0) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket_path}")
        self.stub = pb2_grpc.TextGenerationServiceStub(self.channel)
        self.tokenizer = Tokenizer.from_file(tokenizer_path)
        self.max_input_tokens = max_input_tokens
        self.max_total_tokens = max_total_tokens
        self.max_prefill_tokens = max_prefill_tokens
        self.max_batch_size = max_batch_size
        self.waiting_served_ratio = waiting_served_ratio
        self.max_waiting_tokens = max_waiting_tokens
        self.batch_ids = itertools.count()
        self.request_ids = itertools.count()
        self.entries: dict[int, _Entry] = {}
        self.calls: list[str] = []  # RPC names in order, for assertions
        self.call_seconds: dict[str, float] = {}  # wall time per RPC name (benchmarks: where a run's time went)

    def close(self) -> None:
        self.channel.close()

    def _call(self, name: str, request):
        self.calls.append(name)
        start = time.perf_counter()
        try:
            return getattr(self.stub, name)(request)
        finally:
            self.call_seconds[name] = self.call_seconds.get(name, 0.0) + time.perf_counter() - start

    # ---- start-up -------------------------------------------------------------------------

    def start(self) -> None:
        """ServiceDiscovery, ClearCache, Info, Warmup; set up the allocator like the router."""
        urls = self._call("ServiceDiscovery", pb2.ServiceDiscoveryRequest()).urls
        if not urls or not all(u.startswith("unix://") for u in urls):
            raise RouterPanic(f"bad ServiceDiscovery urls {list(urls)}")
        self._call("ClearCache", pb2.ClearCacheRequest())
        self.info = self._call("Info", pb2.InfoRequest())
        if self.info.requires_padding or self.info.block_size < 1:
            raise RouterPanic(f"unexpected Info {self.info}")
        self.warmup = self._call("Warmup", self.warmup_request())
        w = self.warmup
        assert w.max_input_tokens == self.max_input_tokens and w.max_total_tokens == self.max_total_tokens
        assert w.max_input_tokens < w.max_total_tokens <= w.max_supported_total_tokens
        assert self.max_prefill_tokens <= w.max_supported_total_tokens
        kind = PrefixAllocator if self.info.use_prefix_caching else BlockAllocator
        self.allocator = kind(w.max_supported_total_tokens // self.info.block_size, self.info.block_size)

    def warmup_request(self):
        """The router's warm-up batch: filler text, everything switched on, an image on the first request."""
        requests, n_tokens = [], 0
        while n_tokens < self.max_prefill_tokens:
            truncate = min(self.max_input_tokens, self.max_prefill_tokens - n_tokens)
            text = "_test " * truncate
            chunks = [pb2.InputChunk(text=text)]
            inputs = text
            if not requests:
                chunks.append(pb2.InputChunk(image=pb2.Image(data=WARMUP_IMAGE, mimetype="image/jpeg;base64")))
                inputs += f"![](data:image/jpeg;base64,{base64.b64encode(WARMUP_IMAGE).decode()})"
            requests.append(pb2.Request(
                id=0, inputs=inputs, input_chunks=pb2.Input(chunks=chunks), truncate=truncate,
                add_special_tokens=True, prefill_logprobs=True, top_n_tokens=20,
                parameters=pb2.NextTokenChooserParameters(
                    temperature=0.9, top_k=10, top_p=0.9, typical_p=0.9, do_sample=False, seed=0,
                    repetition_penalty=1.2, frequency_penalty=0.1, watermark=True),
                stopping_parameters=pb2.StoppingCriteriaParameters(
                    max_new_tokens=self.max_total_tokens - truncate, ignore_eos_token=True),
            ))
            n_tokens += truncate
            if len(requests) >= self.max_batch_size:
                break
        batch = pb2.Batch(id=0, requests=requests, size=len(requests), max_tokens=self.max_input_tokens)
        return pb2.WarmupRequest(batch=batch, max_input_tokens=self.max_input_tokens,
                                 max_prefill_tokens=self.max_prefill_tokens, max_total_tokens=self.max_total_tokens)

    # ---- requests -------------------------------------------------------------------------

    def prompt_ids(self, req: EmuRequest) -> list[int]:
        """The ids the router counts (and the shard computes): the last `truncate` of the encoding."""
        ids = self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens).ids
        return ids[-(req.truncate or self.max_input_tokens):]

    def request_pb(self, rid: int, req: EmuRequest, blocks: list[int], slots: list[int], cache_len: int = 0):
        """generate.v3.Request with the router's defaults under the overrides."""
        params = dict(temperature=1.0, top_k=0, top_p=1.0, typical_p=1.0, do_sample=False, seed=0,
                      repetition_penalty=1.0, frequency_penalty=0.0, watermark=False)
        params.update(req.parameters)
        return pb2.Request(
            id=rid, inputs=req.prompt, input_chunks=pb2.Input(chunks=[pb2.InputChunk(text=req.prompt)]),
            truncate=req.truncate or self.max_input_tokens, add_special_tokens=req.add_special_tokens,
            parameters=pb2.NextTokenChooserParameters(**params),
            stopping_parameters=pb2.StoppingCriteriaParameters(
                max_new_tokens=req.max_new_tokens, stop_sequences=req.stop_sequences,
                ignore_eos_token=req.ignore_eos),
            prefill_logprobs=req.prefill_logprobs, top_n_tokens=req.top_n_tokens,
            blocks=blocks, slots=slots, cache_len=cache_len,
        )

    def _allocate(self, req: EmuRequest, ids: list[int]) -> tuple[_Entry, list[int], int] | None:
        """(entry, slots, cache_len) of a queued request, or None when the cache is full; with prefix caching the
        cached blocks its prompt starts with are read, not computed."""
        tokens = len(ids) + req.max_new_tokens + self.info.speculate - 1
        prompt = _cacheable(req, ids)
        allocation = self.allocator.allocate_prompt(tokens, prompt)
        if allocation is None:
            return None
        blocks, slots, cache_len, shared = allocation
        return _Entry(req, None, blocks, prompt, shared), slots, cache_len

    def _release(self, entry: _Entry, keep: bool = False) -> None:
        """A request's blocks back to the allocator; `keep`: its prompt's K/V were all computed (cacheable)."""
        self.allocator.release(entry.blocks, entry.shared, entry.prompt_ids, keep)

    def _next_batch(self, queue: list[tuple[EmuRequest, EmuResult]], room: int, min_size: int = 1,
                    budget: int | None = None):
        """Take queued requests while the batch size, the prefill token budget (max_prefill_tokens unless
        given, rounded up to whole blocks) and the allocator allow (FIFO). With chunking, the request that
        does not fit is cut to what is left of the budget (chunk_len) and ends the batch."""
        requests, prefill_tokens = [], 0
        budget = self.max_prefill_tokens if budget is None else budget
        if budget <= 0:
            return None
        budget = -(-budget // self.info.block_size) * self.info.block_size
        while queue and len(requests) < room:
            req, result = queue[0]
            ids = self.prompt_ids(req)
            uncached = len(ids) - self.allocator.cached_len(_cacheable(req, ids) or [])  # what the prefill computes
            chunk = None
            if prefill_tokens + uncached > budget:
                chunk = budget - prefill_tokens if self.info.support_chunking else 0
                if chunk <= 0:
                    break
            allocation = self._allocate(req, ids)
            if allocation is None:
                break
            entry, slots, cache_len = allocation
            queue.pop(0)
            rid = next(self.request_ids)
            entry.result = result
            self.entries[rid] = entry
            requests.append(self.request_pb(rid, req, entry.blocks, slots, cache_len))
            if chunk is not None:
                requests[-1].chunk_len = chunk
                break
            prefill_tokens += uncached
        if len(requests) < max(min_size, 1):  # too small: every entry goes back to the queue, in order
            for request in reversed(requests):
                entry = self.entries.pop(request.id)
                self._release(entry)
                queue.insert(0, (entry.request, entry.result))
            return None
        return pb2.Batch(id=next(self.batch_ids), requests=requests, size=len(requests),
                         max_tokens=sum(len(r.slots) for r in requests))

    def run(self, requests: list[EmuRequest], max_ticks: int = 10_000, on_tick=None,
            clients: int | None = None) -> list[EmuResult]:
        """Serve every request with continuous batching; results in request order. on_tick(tick) runs first.
        clients=c: c clients in a closed loop, each sending its next request (in order, from its arrival
        tick on) once its previous one has ended, so at most c are queued or running at any time."""
        results = [EmuResult() for _ in requests]
        pending = sorted(zip(requests, results), key=lambda p: p[0].arrival)
        queue: list[tuple[EmuRequest, EmuResult]] = []
        running, waited = None, 0
        for tick in range(max_ticks):
            while pending and pending[0][0].arrival <= tick and (
                    clients is None or len(queue) + len(self.entries) < clients):
                queue.append(pending.pop(0))
            if not (pending or queue or running):
                break
            if on_tick is not None:
                on_tick(tick)
            if running is None:
                new_batch = self._next_batch(queue, self.max_batch_size)
                running, waited = (self._prefill(new_batch) if new_batch else None), 1
                continue
            if self.info.support_chunking:
                running = self._join(queue, running)
                if running is None:
                    continue
            batches = [running]
            new_batch = None if self.info.support_chunking else self._admit(queue, running.size, waited)
            if new_batch is not None:
                waited = 1
                new_cached = self._prefill(new_batch)
                if new_cached is not None:
                    batches.append(new_cached)
            running = self._decode(batches)
            waited += 1
        else:
            raise RouterPanic("the loop did not finish")
        return results

    def _admit(self, queue: list, running_size: int, waited: int):
        """A new batch beside a running one, if TGI's backpressure lets the queue in (see the module doc)."""
        room = self.max_batch_size - running_size
        if room <= 0 or not queue:
            return None
        min_size = 1 if waited >= self.max_waiting_tokens else math.floor(running_size * self.waiting_served_ratio)
        if len(queue) < min_size:
            return None
        return self._next_batch(queue, room, min_size)

    def _join(self, queue: list, running):
        """Chunking: queued requests join the running batch's next step (Prefill with cached_batch), within
        max_prefill_tokens less the running batch's current_tokens, whatever the batch size."""
        new_batch = self._next_batch(queue, sys.maxsize, budget=self.max_prefill_tokens - running.current_tokens)
        return running if new_batch is None else self._prefill(new_batch, running)

    def _prefill(self, batch, cached=None):
        request = pb2.PrefillRequest(batch=batch)
        if cached is not None:
            request.cached_batch.CopyFrom(cached)
        try:
            response = self._call("Prefill", request)
        except grpc.RpcError as err:  # the router fails every request of the call and clears the new batch
            self._fail([r.id for r in batch.requests] + (list(cached.request_ids) if cached else []), err)
            self._call("ClearCache", pb2.ClearCacheRequest(id=batch.id))
            return None
        return self._after_step(response)

    def _decode(self, batches):
        try:
            response = self._call("Decode", pb2.DecodeRequest(batches=batches))
        except grpc.RpcError as err:
            self._fail([i for b in batches for i in b.request_ids], err)
            for b in batches:
                self._call("ClearCache", pb2.ClearCacheRequest(id=b.id))
            return None
        return self._after_step(response)

    def _fail(self, request_ids: list[int], err: grpc.RpcError) -> None:
        for rid in request_ids:
            entry = self.entries.pop(rid, None)
            if entry is not None:
                entry.result.error = f"{err.code().name}: {err.details()}"
                self._release(entry)

    def _after_step(self, response):
        """Stream generations, drop finished/cancelled entries, then filter the batch like the router."""
        for gen in response.generations:
            self._receive(gen)
        batch = response.batch if response.HasField("batch") else None
        if batch is None:
            return None
        if batch.size != len(batch.request_ids):
            raise RouterPanic(f"CachedBatch.size {batch.size} != {len(batch.request_ids)} request ids")
        live = [i for i in batch.request_ids if i in self.entries]
        if len(live) == batch.size:
            return batch
        if not live:
            self._call("ClearCache", pb2.ClearCacheRequest(id=batch.id))
            return None
        filtered = self._call("FilterBatch", pb2.FilterBatchRequest(batch_id=batch.id, request_ids=live)).batch
        if sorted(filtered.request_ids) != sorted(live):
            raise RouterPanic(f"FilterBatch kept {list(filtered.request_ids)}, asked {live}")
        return filtered

    def _receive(self, gen) -> None:
        entry = self.entries.get(gen.request_id)
        if entry is None:
            raise RouterPanic(f"ID not found in entries: {gen.request_id}")
        t = gen.tokens
        if not t.ids or not (len(t.ids) == len(t.logprobs) == len(t.texts) == len(t.is_special)):
            raise RouterPanic(f"bad tokens for request {gen.request_id}: {t}")
        result = entry.result
        if gen.HasField("prefill_tokens") and len(gen.prefill_tokens.ids):
            result.prefill_tokens = gen.prefill_tokens
        result.token_ids += list(t.ids)
        result.texts += list(t.texts)
        result.is_special += list(t.is_special)
        result.logprobs += list(t.logprobs)
        result.tokens_per_generation.append(len(t.ids))
        if entry.request.top_n_tokens:
            if len(gen.top_tokens) != len(t.ids):
                raise RouterPanic(f"top_tokens {len(gen.top_tokens)} for {len(t.ids)} tokens")
            result.top_tokens += [list(tt.ids) for tt in gen.top_tokens]
        finished = gen.HasField("generated_text")
        if finished:
            result.generated_text = gen.generated_text
        cancel = entry.request.cancel_after is not None and len(result.token_ids) >= entry.request.cancel_after
        if finished or cancel:
            result.cancelled = cancel and not finished
            del self.entries[gen.request_id]
            self._release(entry, keep=True)  # a token came: the prompt's K/V were all computed

    # ---- health ---------------------------------------------------------------------------

    def health_probe(self):
        """The router's liveness Prefill after a failure: ids 2^64-1, block 0, slot 0, one token."""
        request = pb2.Request(
            id=HEALTH_ID, inputs="liveness", input_chunks=pb2.Input(chunks=[pb2.InputChunk(text="liveness")]),
            truncate=1, add_special_tokens=False, prefill_logprobs=False, top_n_tokens=0,
            parameters=pb2.NextTokenChooserParameters(
                temperature=1.0, top_k=0, top_p=1.0, typical_p=1.0, do_sample=False, seed=0,
                repetition_penalty=1.0, frequency_penalty=0.0, watermark=False),
            stopping_parameters=pb2.StoppingCriteriaParameters(max_new_tokens=1, ignore_eos_token=False),
            blocks=[0], slots=[0], cache_len=0,
        )
        batch = pb2.Batch(id=HEALTH_ID, requests=[request], size=1, max_tokens=2, max_blocks=1)
        return self._call("Prefill", pb2.PrefillRequest(batch=batch))


class InProcessShard:
    """The shard's gRPC server in this process (so tests may monkeypatch the engine), on a unix socket."""

    def __init__(self, options) -> None:
        from tgi_space.server.service import build_shard, create_server  # noqa: PLC0415

        self.options = options
        self.shard = build_shard(options)
        self.server = create_server(self.shard, options)

    @property
    def socket_path(self) -> str:
        return self.options.socket_path

    def router(self, **limits) -> RouterEmulation:
        """A started router emulation connected to this shard."""
        emu = RouterEmulation(self.socket_path, str(Path(self.options.model_dir) / "tokenizer.json"), **limits)
        emu.start()
        return emu

    def stop(self) -> None:
        self.server.stop(grace=None).wait()


def launcher_argv(model_dir, uds_path, *extra: str) -> list[str]:
    """`serve` exactly as TGI's launcher/src/main.rs builds it (flags in its order); `extra` goes before OTLP."""
    return ["serve", str(model_dir), "--uds-path", str(uds_path), "--logger-level", "INFO", "--json-output",
            *extra, "--otlp-service-name", "text-generation-inference.router"]


def launcher_env(**extra: str) -> dict[str, str]:
    """The environment the launcher gives shard 0 of a single-shard run."""
    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500",
           "TORCH_NCCL_AVOID_RECORD_STREAMS": "1", "CUDA_MEMORY_FRACTION": "1", "SAFETENSORS_FAST_GPU": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_ENABLE_HF_TRANSFER": "1", "CUDA_GRAPHS": "1,2,4,8,16,32",
           "ATTENTION": "paged", "PREFIX_CACHING": "0"}
    env.update(extra)
    return env


class ShardProcess:
    """The `text-generation-server` console script as the launcher spawns it; ready when the socket exists."""

    def __init__(self, model_dir, uds_path, extra_argv: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 nice: int = 19, timeout: float = 120.0) -> None:
        self.model_dir = Path(model_dir)
        self.socket_path = f"{uds_path}-0"
        exe = Path(sys.executable).with_name("text-generation-server")
        self.argv = [str(exe), *launcher_argv(model_dir, uds_path, *extra_argv)]
        full_env = {**os.environ, **launcher_env(), **(env or {})}
        port = full_env.get("TGI_SPACE_METRICS_PORT")
        self.metrics_port = int(port) if port else None  # where the shard exports its Prometheus metrics
        # Files, not pipes: a long run logs more than a pipe buffer holds, and nobody reads until the end.
        self.out_file, self.err_file = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(["nice", "-n", str(nice), *self.argv], env=full_env, stdout=self.out_file,
                                     stderr=self.err_file, text=True, start_new_session=True)
        self.timeout = timeout
        self.stdout = self.stderr = ""

    def wait_ready(self) -> "ShardProcess":
        """Block until the socket file exists (the launcher's readiness test); raise with stderr if it died."""
        deadline = time.time() + self.timeout
        while not Path(self.socket_path).exists():
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"shard did not start (exit {self.proc.returncode}): {self.stderr[-4000:]}")
            time.sleep(0.1)
        return self

    def router(self, **limits) -> RouterEmulation:
        """A started router emulation connected to this shard."""
        emu = RouterEmulation(self.socket_path, str(self.model_dir / "tokenizer.json"), **limits)
        emu.start()
        return emu

    def stop(self) -> int:
        """SIGTERM, like the launcher on shutdown; returns the exit code and keeps stdout/stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stdout, self.stderr = self._read(self.out_file), self._read(self.err_file)
        return self.proc.returncode

    @staticmethod
    def _read(file) -> str:
        file.seek(0)
        return file.read()
