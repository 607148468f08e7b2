"""The shard's batch: TGI's contract (`from_pb`, `filter`, `concatenate`, `__len__`) over SPACE sequences.

Each request carries its engine `Sequence`, which holds the SPACE state between
steps (pending candidates, their draft distributions, the sampling generator,
how many tokens have KV). Filter and concatenate move these objects, never
rebuild them, so a request's candidates follow it from batch to batch.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterator

import torch

from tgi_space.engine import Engine
from tgi_space.sampling import SamplingParams
from tgi_space.sequence import Sequence, TokenInfo
from tgi_space.server.generation import GeneratedText, Generation, Tokens
from tgi_space.tokenizer import Tokenizer
from tgi_space.watermark import Watermark


class InvalidRequest(ValueError):
    """A request the shard refuses; the interceptor turns it into INVALID_ARGUMENT."""


class CapacityError(RuntimeError):
    """The KV cache cannot hold what was asked; becomes RESOURCE_EXHAUSTED."""


@dataclass
class BatchContext:
    """What building requests needs from the shard: the engine, the SPACE switch, settings."""

    engine: Engine
    speculate: bool  # SPACE on for new requests (checkpoint + SPECULATE_MODE + --speculate)
    watermark: Watermark
    seq_ids: Iterator[int] = field(default_factory=itertools.count)  # engine ids; router ids may repeat
    method: str = "space"  # how speculating requests speculate: "space" or "sdsat" (SPECULATE_MODE)
    chunking: bool = False  # Info.support_chunking: Prefill may join a cached batch and cut prompts (chunk_len)
    prefix_caching: bool = False  # Info.use_prefix_caching: a request's first cache_len prompt tokens are cached

    @property
    def mode(self) -> str:
        """A new request's speculate mode: "space", "sdsat" or "none"."""
        return self.method if self.speculate else "none"

    @property
    def num_slots(self) -> int:
        """Flat KV slots in the cache (router block ids * block_size + offset must stay below)."""
        return self.engine.num_slots  # scratch slots after these are the engine's own


def prompt_text(pb) -> str:
    """The text the router tokenized: the text chunks joined (images skipped), else `inputs`."""
    if pb.HasField("input_chunks") and pb.input_chunks.chunks:
        return "".join(c.text for c in pb.input_chunks.chunks if c.WhichOneof("chunk") == "text")
    return pb.inputs


def tokenize(tokenizer: Tokenizer, text: str, truncate: int, add_special_tokens: bool) -> list[int]:
    """Ids as the router counts them: tokenizer.json, then the last `truncate` ids (0 = all)."""
    ids = tokenizer.hf.encode(text, add_special_tokens=add_special_tokens).ids
    return ids[-truncate:] if truncate else ids


def sampling_params(pb, watermark: Watermark) -> SamplingParams:
    """SamplingParams of a generate.v3.Request; proto3 zeros of ratio fields mean 'off'."""
    p, s = pb.parameters, pb.stopping_parameters
    return SamplingParams(
        max_new_tokens=s.max_new_tokens,
        do_sample=p.do_sample,
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p or 1.0,
        typical_p=p.typical_p or 1.0,
        repetition_penalty=p.repetition_penalty or 1.0,
        frequency_penalty=p.frequency_penalty,
        seed=p.seed,
        stop=list(s.stop_sequences),
        ignore_eos=s.ignore_eos_token,
        top_n_tokens=pb.top_n_tokens,
        watermark=watermark if p.watermark else None,
    )


def reject_unsupported(pb) -> None:
    """Fields we do not implement are refused by name, never silently ignored."""
    if pb.parameters.grammar or pb.parameters.grammar_type:
        raise InvalidRequest("parameters.grammar: grammar-constrained decoding is not supported by this shard")
    if pb.HasField("adapter_id") and pb.adapter_id:
        raise InvalidRequest(f"adapter_id: LoRA adapters are not supported (got {pb.adapter_id!r})")


class Detokenizer:
    """Incremental token texts (TGI's decode_token): the text a token adds, '' while bytes are incomplete."""

    def __init__(self, tokenizer: Tokenizer, num_prompt: int) -> None:
        self.tokenizer = tokenizer
        self.prefix_offset = max(0, num_prompt - 5)
        self.read_offset = num_prompt

    def next_text(self, all_ids: list[int]) -> str:
        """Text added by all_ids[-1]."""
        decode = self.tokenizer.hf.decode
        prefix = decode(all_ids[self.prefix_offset : self.read_offset], skip_special_tokens=False)
        text = decode(all_ids[self.prefix_offset :], skip_special_tokens=False)
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(all_ids)
            return text[len(prefix) :]
        return ""


@dataclass
class ShardRequest:
    """One router request in flight; `seq` carries the SPACE state between steps."""

    request_id: int
    seq: Sequence
    slots: torch.Tensor  # [S] long: KV of position p is at slots[p]; owned by the router
    prefill_logprobs: bool
    seed: int | None  # reported in GeneratedText when sampling
    detokenizer: Detokenizer
    chunk_len: int | None = None  # prompt tokens the router lets the first step compute (None: all of them)
    cache_len: int = 0  # prompt tokens whose K/V the router says are in their slots already (prefix caching)
    prompt_logprobs: list[float] = field(default_factory=lambda: [float("nan")])  # gathered chunk by chunk

    @classmethod
    def from_pb(cls, pb, ctx: BatchContext, own_slots: torch.Tensor | None = None) -> "ShardRequest":
        """Validate and build; raises InvalidRequest naming the field. own_slots: warm-up only."""
        reject_unsupported(pb)
        engine = ctx.engine
        ids = tokenize(engine.tokenizer, prompt_text(pb), pb.truncate, pb.add_special_tokens)
        try:
            params = sampling_params(pb, ctx.watermark)
            engine.validate_request(ids, params, ctx.mode)
        except ValueError as err:
            raise InvalidRequest(f"request {pb.id}: {err}") from err
        slots = own_slots if own_slots is not None else _router_slots(pb, len(ids), params, ctx.num_slots)
        cache_len = _cache_len(pb, len(ids), ctx.prefix_caching)
        generator = None if params.is_greedy else torch.Generator().manual_seed(params.seed)
        seq = Sequence(next(ctx.seq_ids), ids, params, ctx.speculate, generator, sdsat=ctx.mode == "sdsat")
        seq.num_cached = cache_len  # their K/V are in slots[:cache_len]: the first step computes the rest
        seed = None if params.is_greedy else params.seed
        return cls(pb.id, seq, slots, pb.prefill_logprobs, seed, Detokenizer(engine.tokenizer, len(ids)),
                   _chunk_len(pb, len(ids) - cache_len, ctx.chunking), cache_len)

    def generation(self, emitted: list[TokenInfo], prefill_tokens: Tokens | None) -> Generation:
        """This step's Generation: every emitted token, top tokens, and the text when finished."""
        tok = self.seq_tokenizer
        seq = self.seq
        start = len(seq.tokens) - len(emitted)
        tokens = Tokens()
        for j, info in enumerate(emitted):
            tokens.ids.append(info.token_id)
            tokens.logprobs.append(info.logprob)
            tokens.texts.append(self.detokenizer.next_text(seq.tokens[: start + j + 1]))
            tokens.is_special.append(tok.is_special(info.token_id))
        top = [_top_tokens(tok, info) for info in emitted] if seq.params.top_n_tokens else None
        return Generation(self.request_id, tokens, prefill_tokens, top, self._generated_text())

    @property
    def seq_tokenizer(self) -> Tokenizer:
        """The checkpoint's tokenizer (held by the detokenizer)."""
        return self.detokenizer.tokenizer

    def _generated_text(self) -> GeneratedText | None:
        """Set on the finishing step: decode from one prompt token before, so a leading space stays."""
        seq = self.seq
        if not seq.is_finished:
            return None
        if seq.error:  # TGI's Generation has no error field: the RPC fails, as TGI's own server does
            raise RuntimeError(f"request {seq.seq_id} failed in the engine: {seq.error}")
        decode = self.seq_tokenizer.decode
        context = seq.tokens[seq.num_prompt - 1 :]
        text = decode(context)[len(decode(context[:1])) :]
        return GeneratedText(text, len(seq.output_ids), seq.finish_reason, self.seed)


def _chunk_len(pb, uncached: int, chunking: bool) -> int | None:
    """The router's chunk_len, checked: only with chunking, 1..the prompt's uncached tokens; None when all of them
    run."""
    if not pb.HasField("chunk_len"):
        return None
    if not chunking:
        raise InvalidRequest("chunk_len: prefill chunking is off (Info.support_chunking = false; PREFILL_CHUNKING=0)")
    if not 1 <= pb.chunk_len <= uncached:
        raise InvalidRequest(f"request {pb.id}: chunk_len: {pb.chunk_len} is not within 1..{uncached} (the prompt's "
                             "tokens after cache_len)")
    return pb.chunk_len if pb.chunk_len < uncached else None


def _cache_len(pb, num_prompt: int, prefix_caching: bool) -> int:
    """The router's cache_len, checked: only with prefix caching, below the prompt's length (one token at least is
    computed, as upstream asserts), never with prefill_logprobs (the cached tokens' log-probabilities are gone)."""
    if not pb.cache_len:
        return 0
    if not prefix_caching:
        raise InvalidRequest("cache_len: prefix caching is off (Info.use_prefix_caching = false; "
                             "TGI_SPACE_PREFIX_CACHING=1 turns it on)")
    if pb.cache_len >= num_prompt:
        raise InvalidRequest(f"request {pb.id}: cache_len: {pb.cache_len} is not within 0..{num_prompt - 1} (the "
                             "prompt's tokens less one)")
    if pb.prefill_logprobs:
        raise InvalidRequest(f"request {pb.id}: cache_len: {pb.cache_len} with prefill_logprobs (the router never "
                             "matches a prefix for a request that asks for the prompt's log-probabilities)")
    return pb.cache_len


def _router_slots(pb, num_prompt: int, params: SamplingParams, num_slots: int) -> torch.Tensor:
    """The router's slots, checked: enough for every position we will write, inside the cache."""
    need = num_prompt + params.max_new_tokens - 1
    if len(pb.slots) < need:
        raise InvalidRequest(
            f"request {pb.id}: slots: got {len(pb.slots)}, need {need} (prompt {num_prompt} + "
            f"max_new_tokens {params.max_new_tokens} - 1); do router and shard tokenize alike?"
        )
    slots = torch.tensor(list(pb.slots), dtype=torch.long)
    if int(slots.max()) >= num_slots:
        raise InvalidRequest(f"request {pb.id}: slots: slot {int(slots.max())} is outside the cache ({num_slots})")
    return slots


def _top_tokens(tokenizer: Tokenizer, info: TokenInfo) -> Tokens:
    """The top_n alternatives of one emitted token."""
    ids = [i for i, _ in info.top]
    return Tokens(
        ids=ids,
        logprobs=[lp for _, lp in info.top],
        texts=[tokenizer.token_text(i) for i in ids],
        is_special=[tokenizer.is_special(i) for i in ids],
    )


class SlotTable:
    """The engine's SlotSource over router-owned slots: position p of a sequence -> its slots[p]."""

    def __init__(self, requests: list[ShardRequest]) -> None:
        self.table = {r.seq.seq_id: r.slots for r in requests}

    def slots(self, seq_id: int, start: int, stop: int) -> torch.Tensor:
        """Slots [stop - start] of positions start..stop-1."""
        table = self.table[seq_id]
        if stop > table.numel():
            raise RuntimeError(f"sequence {seq_id}: position {stop - 1} has no slot (only {table.numel()})")
        return table[start:stop]


@dataclass
class SpaceBatch:
    """A cached batch: its id and the live requests, in the order the router sent them."""

    batch_id: int
    requests: list[ShardRequest]

    @classmethod
    def from_pb(cls, pb, ctx: BatchContext) -> "SpaceBatch":
        """Build every request first; any bad request fails the whole batch with nothing kept."""
        if not pb.requests:
            raise InvalidRequest("batch.requests: a batch needs at least one request")
        return cls(pb.id, [ShardRequest.from_pb(r, ctx) for r in pb.requests])

    @classmethod
    def from_pb_self_allocated(cls, pb, ctx: BatchContext) -> "SpaceBatch":
        """Warm-up: requests come without slots; give each its prompt's slots from slot 0 on."""
        requests, offset = [], 0
        for r in pb.requests:
            num_prompt = len(tokenize(ctx.engine.tokenizer, prompt_text(r), r.truncate, r.add_special_tokens))
            if offset + num_prompt > ctx.num_slots:
                raise CapacityError(
                    f"warm-up: the batch needs more than {ctx.num_slots} KV slots (the whole cache); "
                    "lower --max-batch-prefill-tokens or give the shard more cache (TGI_SPACE_KV_CACHE_BYTES)"
                )
            requests.append(ShardRequest.from_pb(r, ctx, torch.arange(offset, offset + num_prompt)))
            offset += num_prompt
        return cls(pb.id, requests)

    def __len__(self) -> int:
        return len(self.requests)

    def filter(self, request_ids: list[int]) -> "SpaceBatch":
        """Keep the listed requests (ids we already dropped as finished are ignored)."""
        keep = set(request_ids)
        return SpaceBatch(self.batch_id, [r for r in self.requests if r.request_id in keep])

    @classmethod
    def concatenate(cls, batches: list["SpaceBatch"]) -> "SpaceBatch":
        """One batch of all requests, under the first batch's id (as TGI)."""
        return cls(batches[0].batch_id, [r for b in batches for r in b.requests])

    @property
    def max_tokens(self) -> int:
        """Slots the router reserved for this batch (its budget bookkeeping)."""
        return sum(r.slots.numel() for r in self.requests)

    @property
    def current_tokens(self) -> int:
        """Chain tokens of the next forward without candidates (tokens not yet in the KV cache)."""
        return sum(len(r.seq.tokens) - r.seq.num_cached for r in self.requests)

    def to_pb(self, pb2):
        """generate.v3.CachedBatch."""
        ids = [r.request_id for r in self.requests]
        return pb2.CachedBatch(
            id=self.batch_id, request_ids=ids, size=len(ids), max_tokens=self.max_tokens,
            current_tokens=self.current_tokens,
        )
