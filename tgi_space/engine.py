"""The engine: one forward pass per step over a ragged batch, then verify, emit and draft."""

from __future__ import annotations

import itertools
import time
import logging
from dataclasses import dataclass
from typing import Protocol

import torch

from tgi_space.attention.backend import make_backend
from tgi_space.attention.metadata import AttentionMetadata
from tgi_space.config import SPECULATE_MODES, EngineConfig, ModelConfig
from tgi_space.datastore import END as DATASTORE_END
from tgi_space.datastore import datastore_path
from tgi_space.datastore import index_of as datastore_index
from tgi_space.datastore import load as load_datastore
from tgi_space.drafters import SuffixIndex
from tgi_space.kv_cache import BlockManager, allocate_kv_cache, available_memory, kv_bytes_per_token
from tgi_space.model.adapter import adapter_dir, load_adapter
from tgi_space.model.llama import ForwardContext
from tgi_space.model.loader import TORCH_DTYPES, load_model
from tgi_space.model.rotary import RotaryEmbedding
from tgi_space.sampling import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    SamplingParams,
    accept_greedy,
    apply_warpers,
    draft,
    process,
    verify_greedy,
    verify_sampled,
)
from tgi_space.logit_stats import LogitStats, logit_stats, reads_stats
from tgi_space.scheduler import Scheduler
from tgi_space.sdsat import Sdsat, check_checkpoint
from tgi_space.sequence import Sequence, TokenInfo
from tgi_space.space import SeqPlan, StepLayout, build_layout, split_logits
from tgi_space.model.prepack import packing, prepack_linears, warm_packed, warm_rows
from tgi_space.speculation import Speculator, any_sampled, measure_forward, probe_row_counts, sampling_regime
from tgi_space.tokenizer import Tokenizer

log = logging.getLogger(__name__)
PROBE_CACHE_BYTES = 64 << 20  # the latency probes' own K/V cache at most (`Engine._probe_caches`)
LOGIT_CHUNK = 256  # prompt rows per logits chunk when prompt log-probabilities are asked for
FINISH_ERROR = "error"  # the request failed alone inside a step; Sequence.error says why


@dataclass
class DecodeTotals:
    """Running sums over the engine's decode steps (every plan a whole step, none a prompt chunk), whatever
    the mode: what a benchmark or a metrics scrape turns into rows and tokens per step and the ceiling."""

    steps: int = 0
    sequences: int = 0  # sequence-steps: the batch size, summed over steps
    rows: int = 0  # query rows sent
    tokens: int = 0  # tokens emitted
    seconds: float = 0.0  # wall time of the steps (forward, verification, drafting)
    # With a measured latency surface t(rows, batch): sum of t(rows sent) and of t(one row per sequence).
    # (tokens / curve_seconds) / (sequences / curve_plain_seconds) is the ceiling: the speed over plain
    # decoding that the tokens per step allow at the measured cost of the rows, all else free.
    curve_seconds: float = 0.0
    curve_plain_seconds: float = 0.0

    def add(self, num_seqs: int, rows: int, tokens: int, seconds: float, curve=None) -> None:
        """One decode step; `curve`: the planner's latency surface, when measured."""
        self.steps += 1
        self.sequences += num_seqs
        self.rows += rows
        self.tokens += tokens
        self.seconds += seconds
        if curve is not None:
            self.curve_seconds += curve(rows, num_seqs)
            self.curve_plain_seconds += curve(num_seqs, num_seqs)


class SlotSource(Protocol):
    """Maps a sequence's token positions to flat KV-cache slots (our BlockManager, or the TGI router's slots)."""

    def slots(self, seq_id: int, start: int, stop: int) -> torch.Tensor:
        """Slots [stop - start] of positions start..stop-1."""
        ...


class SpaceUnavailable(ValueError):
    """SPACE (or SDSAT) was asked of a checkpoint that cannot drive it (no mask token, ...)."""


class Engine:
    """Owns the model, the KV cache and the scheduler; `step()` advances every running request."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_config = ModelConfig.from_dir(config.model_dir)
        self.tokenizer = Tokenizer(config.model_dir)
        self.dtype = TORCH_DTYPES[config.dtype]
        self.model = load_model(config.model_dir, self.model_config, config.dtype, config.device)
        self.model_config = self._attach_adapter()
        self.packed = prepack_linears(self.model, packing(config.device, config.dtype)) if config.prepack_weights else {}
        self._warm_gemms()
        self.rotary = RotaryEmbedding(self.model_config, config.device, self.dtype)
        self.backend = make_backend(config.attention_backend)
        num_blocks = self._num_cache_blocks()
        self.num_slots = num_blocks * config.block_size  # sequence slots; scratch slots follow them
        num_scratch = config.max_num_seqs * config.space.max_tree_nodes
        # scratch slot indices live on the host like every other slot list; moved with the step's writes
        self.scratch_slots = torch.arange(self.num_slots, self.num_slots + num_scratch)
        self.kv_caches = allocate_kv_cache(
            self.model_config, num_blocks, config.block_size, self.dtype, config.device, extra_slots=num_scratch
        )
        self.model.ctx = self._context(self.kv_caches)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.prefix_caching)
        self.k_max = self._k_max()
        self.planned = config.space.planner and (self.k_max > 0 or "suffix" in config.space.drafters)
        probe_rows = self.model_config.max_model_len - self._probe_context
        self.speculator = Speculator(config.space, self.k_max, self._measure_rows, config.max_num_seqs, probe_rows,
                                     self._datastore())
        self.sdsat = self._sdsat()  # plans SDSAT sequences' passes (sdsat.py)
        self.scheduler = Scheduler(
            self.block_manager, config.space, 0 if self.planned else self.k_max, config.max_num_seqs,
            config.max_num_batched_tokens, reserve=config.space.max_tree_depth if self.planned else 0,
            sdsat_reserve=self.sdsat.max_path,
        )
        self.eos_ids = set(self.model_config.eos_token_ids) | (
            {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        )
        self._ids = itertools.count()
        self._seed_rng = torch.Generator().manual_seed(config.seed)
        self.num_steps = 0
        self.totals = DecodeTotals()  # decode steps since start (metrics, benchmarks)
        self.last_step: tuple[StepLayout, torch.Tensor] | None = None  # set by execute(keep_hidden=True)

    # ---- set-up -------------------------------------------------------------------------

    def _attach_adapter(self) -> ModelConfig:
        """Load the gated SPACE adapter, if any (docs/adapters.md); its mask token id and k then count."""
        folder = adapter_dir(self.config.model_dir, self.config.adapter, self.model_config)
        if folder is None:
            return self.model_config
        self.model.adapter = load_adapter(folder, self.model)
        log.info("gated SPACE adapter %s loaded (%s)", folder, ", ".join(self.model.adapter.config.target_modules))
        return self.model.adapter.config.apply_to(self.model_config)

    def _sdsat(self) -> Sdsat:
        """SDSAT's planner: with the planned step and the suffix drafter, its greedy verify passes carry suffix
        drafts too (the planner keeps the nodes worth their rows); else adaptive tokens only (the paper's)."""
        if not (self.planned and "suffix" in self.config.space.drafters):
            return Sdsat(self.config.space, self.k_max)
        return Sdsat(self.config.space, self.k_max, self.speculator.suffix_drafts, self.speculator.sdsat_reach)

    def _datastore(self) -> SuffixIndex | None:
        """The self-drafted datastore's index (datastore.py), when there is one and suffix drafts are on."""
        path = datastore_path(self.config.model_dir, self.config.datastore, self.model_config.space_datastore)
        if path is None or "suffix" not in self.config.space.drafters:
            return None
        tokens = load_datastore(path, self.model_config.vocab_size)
        log.info("datastore %s: %d tokens", path, int((tokens != DATASTORE_END).sum()))
        return datastore_index(tokens, self.config.space.suffix_max_match)

    def _warm_gemms(self) -> None:
        """oneDNN's packed-GEMM kernels for every row count a decode step can send (`warm_gemm_rows`)."""
        if not self.packed:
            return
        rows = self.config.warm_gemm_rows
        if rows is None:
            rows = warm_rows(self.packed, self.config.space.max_step_query_tokens + self.config.max_num_seqs)
        warm_packed(self.packed, rows)

    @property
    def mask_token_id(self) -> int | None:
        """The checkpoint's (or its gated adapter's) [MASK] id, or None if it is not SPACE-ready."""
        return self.model_config.space_mask_token_id

    def _k_max(self) -> int:
        """Candidates per step at most: the policy's, else the checkpoint's trained k."""
        if self.mask_token_id is None:
            return 0
        return self.config.space.k_max if self.config.space.k_max is not None else int(self.model_config.space_k or 4)

    def _num_cache_blocks(self) -> int:
        """KV blocks from the byte budget, or a fraction of memory free after a warm-up forward."""
        per_block = kv_bytes_per_token(self.model_config, self.dtype) * self.config.block_size
        needed = self.config.max_num_seqs * -(-self.model_config.max_model_len // self.config.block_size) + 1
        if self.config.kv_cache_bytes is not None:
            budget = self.config.kv_cache_bytes
        else:
            self._warmup()
            budget = int(available_memory(self.config.device) * self.config.kv_cache_memory_fraction)
        num_blocks = min(needed, budget // per_block)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_bytes: budget {budget} holds no block of {per_block} bytes")
        return num_blocks

    @torch.inference_mode()
    def _measure_rows(self, num_seqs: int, rows: int, group: int = 0) -> float:
        """Seconds of one forward of `rows` query rows over `num_seqs` sequences, laid out as a planned
        step would (`probe_row_counts`), each after `_probe_context` cached tokens. `group` > 0: the first
        sequence's last `group` rows are one mask group (what a gated adapter's deltas cost).
        The probe runs on a throwaway cache (`_probe_caches`), never the live one: the planner probes on first
        use, which in `LLM.generate` is mid-generation, and garbage K/V written into live slots changed the
        outputs of requests decoding at the time."""
        context = self._probe_context
        counts = probe_row_counts(num_seqs, rows)
        plans = [SeqPlan(chain=[0] * n, num_candidates=n - 1, anchors=[], group_size=0, num_cached=context)
                 for n in counts]
        if group:
            chain = counts[0] - group
            plans[0] = SeqPlan(chain=[0] * chain, num_candidates=chain - 1, anchors=[0], group_size=group,
                               num_cached=context)
            counts[0] = chain
        layout = build_layout(plans, self.mask_token_id or 0)
        span = context + max(counts)
        caches = self._probe_caches(num_seqs * span)
        size = caches[0].shape[1]  # slots wrap around the throwaway cache: timing only
        slots = [torch.arange(i * span, i * span + context + n) % size for i, n in enumerate(counts)]
        write, write_rows = torch.cat([s[context:] for s in slots]), self._chain_rows(layout, plans)

        def run() -> None:
            self._forward(layout, [s[:context] for s in slots], write, write_rows)

        live, self.model.ctx.kv_caches = self.model.ctx.kv_caches, caches
        try:
            return measure_forward(run)
        finally:
            self.model.ctx.kv_caches = live

    def _probe_caches(self, slots: int) -> list[torch.Tensor]:
        """A cache for the latency probes alone: `slots` slots, at most PROBE_CACHE_BYTES (then fewer slots,
        which the probe's sequences share: their K/V are never read for their values)."""
        per_slot = kv_bytes_per_token(self.model_config, self.dtype)
        slots = max(1, min(slots, PROBE_CACHE_BYTES // per_slot))
        return allocate_kv_cache(self.model_config, 1, slots, self.dtype, self.config.device)

    @property
    def _probe_context(self) -> int:
        """Cached tokens behind the latency probes: a typical prompt, leaving room for the rows."""
        return min(128, self.model_config.max_model_len // 4)

    def _context(self, kv_caches: list[torch.Tensor]) -> ForwardContext:
        ctx = ForwardContext(kv_caches, self.backend, self.rotary, self.config.gemm_row_block or None)
        ctx.packed = self.packed
        ctx.kernels = getattr(self.backend, "kernels", None)  # the fused backend's RMSNorm and rotary
        return ctx

    @torch.inference_mode()
    def _warmup(self) -> None:
        """A worst-case prefill on a throwaway cache, so peak activation memory is taken first."""
        n = min(self.config.max_num_batched_tokens, self.model_config.max_model_len)
        blocks = -(-n // self.config.block_size)
        caches = allocate_kv_cache(self.model_config, blocks, self.config.block_size, self.dtype, self.config.device)
        self.model.ctx = self._context(caches)
        plan = SeqPlan(chain=[0] * n, num_candidates=0, anchors=[], group_size=0, num_cached=0)
        layout = build_layout([plan], 0)
        slots = torch.arange(n, device=self.config.device)
        self._forward(layout, [torch.empty(0, dtype=torch.long)], slots, torch.arange(n))
        self.model.ctx = None

    # ---- requests -----------------------------------------------------------------------

    def add_request(self, prompt_ids: list[int], params: SamplingParams, speculate: str | None = None) -> Sequence:
        """Validate and queue a request; raises ValueError naming the bad field, allocating nothing.

        speculate: "space", "sdsat" or "none"; None takes the policy's speculate_mode.
        """
        speculate = speculate or self.config.space.speculate_mode
        self.validate_request(prompt_ids, params, speculate)
        generator = None
        if not params.is_greedy:
            seed = params.seed if params.seed is not None else int(torch.randint(2**62, (1,), generator=self._seed_rng))
            generator = torch.Generator(device="cpu").manual_seed(seed)
        speculating = speculate == "space" and (self.planned or self.k_max > 0)
        seq = Sequence(next(self._ids), prompt_ids, params, speculating, generator, sdsat=speculate == "sdsat")
        self.scheduler.add(seq)
        return seq

    def validate_request(self, prompt_ids: list[int], params: SamplingParams, speculate: str | None = None) -> None:
        """Every check a request must pass before it may take cache blocks."""
        params.validate()
        speculate = speculate or self.config.space.speculate_mode
        if speculate not in SPECULATE_MODES:
            raise ValueError(f"speculate must be one of {', '.join(SPECULATE_MODES)}, got {speculate!r}")
        if speculate == "sdsat":
            self.check_sdsat()
        if speculate == "space" and self.mask_token_id is None and not self.planned:
            raise SpaceUnavailable(
                "speculate='space' needs a SPACE checkpoint (config.json space_mask_token_id) "
                "or the planner with suffix drafts (SpacePolicy(planner=True, drafters=('suffix',)))"
            )
        if not prompt_ids:
            raise ValueError("prompt must contain at least one token")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {bad[:5]}")
        limit = self.model_config.max_model_len
        if len(prompt_ids) + params.max_new_tokens > limit:
            raise ValueError(
                f"prompt length ({len(prompt_ids)}) + max_new_tokens ({params.max_new_tokens}) "
                f"must be <= {limit}, the model's context length"
            )
        reserve = max(self.k_max, self.config.space.max_tree_depth)
        if self.block_manager.blocks_for(len(prompt_ids) + params.max_new_tokens + reserve) > self.block_manager.num_blocks:
            raise ValueError("prompt length + max_new_tokens exceeds the whole KV cache")

    def check_sdsat(self) -> None:
        """Raise SpaceUnavailable (naming the config.json field) if this checkpoint cannot decode with SDSAT."""
        try:
            check_checkpoint(self.model_config, self.k_max)
        except ValueError as err:
            raise SpaceUnavailable(str(err)) from None

    def abort(self, seq: Sequence) -> None:
        """Cancel a request and return its blocks."""
        if seq.finish_reason is None:
            seq.finish_reason = "cancelled"
        self.scheduler.finish(seq)

    def has_unfinished(self) -> bool:
        """Whether any request is waiting or running."""
        return self.scheduler.has_work()

    # ---- the step -----------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[tuple[Sequence, list[TokenInfo]]]:
        """Schedule, then one forward pass for every scheduled sequence; what each emitted."""
        planned = self._speculate_whole(self.scheduler.schedule())
        wants = [i for i, (seq, plan) in enumerate(planned)
                 if seq.params.prompt_logprobs and plan.num_cached == 0 and seq.stats.prompt_logprobs is None]
        results = self.execute(planned, self.block_manager, keep_hidden=bool(wants))
        for i in wants:
            seq = planned[i][0]
            seq.stats.prompt_logprobs = [None] + self.prompt_logprobs(i, seq.tokens[: seq.num_prompt])[1:]
        self.last_step = None
        for seq, _ in results:
            if seq.is_finished:
                self.scheduler.finish(seq)
                if self.planned:
                    self.speculator.finished(seq)
        return results

    def _speculate_whole(self, planned: list[tuple[Sequence, SeqPlan]]) -> list[tuple[Sequence, SeqPlan]]:
        """`speculate` for the plans that emit this step; prompt chunks (partial plans) pass as they are."""
        speculated = iter(self.speculate([(seq, plan) for seq, plan in planned if not plan.partial]))
        return [(seq, plan) if plan.partial else next(speculated) for seq, plan in planned]

    def speculate(self, planned: list[tuple[Sequence, SeqPlan]]) -> list[tuple[Sequence, SeqPlan]]:
        """A scheduled step's plans with what speculation sends: the planner's tree nodes and mask groups (when
        planned), and SDSAT's draft or verify passes (those the governor lets run; all, when not planned)."""
        active, depth = None, self.sdsat.max_depth
        if self.planned:
            planned = self.speculator.plan(planned)
            active = self.speculator.sdsat_passes(planned)
            depth = self.speculator.sdsat_depth(planned, active, depth)
            self.speculator.sdsat_trees(planned, active)
        return self.sdsat.plan(planned, active, depth)

    @torch.inference_mode()
    def execute(
        self, planned: list[tuple[Sequence, SeqPlan]], slots: SlotSource, keep_hidden: bool = False
    ) -> list[tuple[Sequence, list[TokenInfo]]]:
        """Run planned sequences whose cache slots `slots` provides; verify, emit, draft.

        With keep_hidden, `last_step` holds (layout, hidden states [N, H]) until the next call.
        """
        if not planned:
            return []
        start = self.speculator.take_step_start() if self.planned else time.perf_counter()
        plans = [plan for _, plan in planned]
        layout = build_layout(plans, self.mask_token_id or 0)
        prefix_slots = [slots.slots(seq.seq_id, 0, plan.num_cached) for seq, plan in planned]
        write_slots = self._write_slots(planned, slots)
        logits = self._forward(layout, prefix_slots, write_slots, self._chain_rows(layout, plans), keep_hidden)
        self.num_steps += 1
        results, self._moves = [], []
        offsets = layout.logit_offsets
        # every row's best tokens and logsumexp, at once (no rows: every sequence sent a prefill chunk)
        stats = logit_stats(logits, self.model.ctx.kernels) if len(logits) else None
        warped = _warp_together(planned, logits, offsets)
        for i, (seq, plan) in enumerate(planned):
            if plan.partial:  # a prefill chunk: its K/V are written, the rest of the prompt comes next step
                seq.num_cached += len(plan.chain)
                results.append((seq, []))
                continue
            seq_logits = logits[offsets[i] : offsets[i + 1]]
            results.append((seq, self._advance_alone(seq, plan, seq_logits, slots, stats.of(offsets[i]), warped.get(i))))
        self._move_accepted_kv()
        seconds = time.perf_counter() - start
        if self.planned:
            self._learn(planned, results, seconds)
        if all(p.num_uncached == 1 and not p.partial for p in plans):
            self.totals.add(len(plans), sum(p.num_rows for p in plans), sum(len(e) for _, e in results), seconds,
                            self.speculator.curve)
        return results

    def _learn(self, planned: list[tuple[Sequence, SeqPlan]], results: list[tuple[Sequence, list[TokenInfo]]],
               seconds: float) -> None:
        """What the planner learns from a step that took `seconds`: its rate (decode steps only: a prefill's
        time says nothing about speculation), and, from SPACE steps, the rows' cost and the drafts' worth."""
        plans = [p for _, p in planned]
        sampled, regime = any_sampled(planned), sampling_regime(planned)
        decode = sum(p.num_uncached for p in plans) == len(plans) and not any(p.partial for p in plans)
        tokens = sum(len(e) for _, e in results)
        rows = sum(p.num_rows for p in plans)
        masks = any(p.anchors for p in plans)
        floor = self.speculator.rows_cost(len(plans), rows, masks, sampled) if decode else 0.0
        if any(seq.sdsat for seq, _ in planned):
            kind = _sdsat_kind(planned)
            if decode and kind is not None:
                self.speculator.defer_rate(len(plans), seconds, tokens, kind, regime, floor)
            self.speculator.end_step(0, 0, 0, sampled)  # (this step's drafting time, kept out of its rows' cost)
            if self.speculator.curve is not None and decode:  # SDSAT's depth and trees are priced by these too
                self.speculator.observe_step(len(plans), rows, len(plans), seconds, masks, sampled)
            self.speculator.step_done()
            return
        trees = [p.tree for p in plans if p.is_tree]
        accepted = sum(len(e) - 1 for p, (_, e) in zip(plans, results) if p.is_tree and e)
        self.speculator.end_step(len(trees), sum(len(t) for t in trees), accepted, sampled)
        candidates = any(p.num_candidates for p in plans)
        if decode:  # a step sending groups with no drafts to verify yet leads the step that verifies them
            kind = ("masks" if candidates else "lead") if masks else "tree" if candidates else "plain"
            self.speculator.defer_rate(len(plans), seconds, tokens, kind, regime, floor)
        if self.speculator.curve is not None and decode:  # decode steps: wall time vs surface
            self.speculator.observe_step(len(plans), rows, len(plans), seconds, masks, sampled)
        self.speculator.step_done()

    def _write_slots(self, planned: list[tuple[Sequence, SeqPlan]], slots: SlotSource) -> torch.Tensor:
        """Cache slot of every chain row: the sequence's own slots, but scratch slots for tree candidates."""
        out, scratch, self._scratch_offsets = [], 0, {}
        for seq, plan in planned:
            own = plan.num_uncached if plan.is_tree else len(plan.chain)
            out.append(slots.slots(seq.seq_id, plan.num_cached, plan.num_cached + own))
            if plan.is_tree:
                self._scratch_offsets[seq.seq_id] = scratch
                out.append(self.scratch_slots[scratch : scratch + plan.num_candidates])
                scratch += plan.num_candidates
        return torch.cat(out)

    def _move_accepted_kv(self) -> None:
        """Copy the accepted tree nodes' K/V from scratch into their sequences' own slots, every layer."""
        if not self._moves:
            return
        src = torch.cat([m[0] for m in self._moves]).to(self.config.device)
        dst = torch.cat([m[1] for m in self._moves]).to(self.config.device)
        for cache in self.kv_caches:
            cache.index_copy_(1, dst, cache.index_select(1, src))

    def _advance_alone(
        self, seq: Sequence, plan: SeqPlan, logits: torch.Tensor, slots: SlotSource, stats: LogitStats,
        target: torch.Tensor | None = None,
    ) -> list[TokenInfo]:
        """`_advance`, but a failure ends this request only (finish reason "error", `seq.error` set).
        `stats`: the step's logit statistics, from the sequence's first logit row on; `target`: its processed
        verify rows when they were processed with other sequences' (`_warp_together`)."""
        try:
            if plan.is_tree:
                return self._advance_tree(seq, plan, logits, slots, stats, target)
            return self._advance(seq, plan, logits, stats, target)
        except Exception as err:  # one request's failure must not fail the others in the step
            log.warning("request %d failed in step %d: %s", seq.seq_id, self.num_steps, err)
            seq.error = f"{type(err).__name__}: {err}"
            seq.finish_reason = FINISH_ERROR
            seq.candidates, seq.draft_probs = [], None
            return []

    def prompt_logprobs(self, index: int, prompt_ids: list[int]) -> list[float]:
        """After `execute(..., keep_hidden=True)` prefilled sequence `index`: each prompt token's
        log-probability given the ones before it (the first: NaN)."""
        return [float("nan")] + self.chain_logprobs(index, prompt_ids[1:])

    @torch.inference_mode()
    def chain_logprobs(self, index: int, targets: list[int]) -> list[float]:
        """After `execute(..., keep_hidden=True)`: the log-probability of targets[i] given sequence `index`'s
        chain up to its row i (a prompt, or a chunk of one), in chunks of the vocabulary's logits."""
        layout, hidden = self.last_step
        first_row = layout.cu_seqlens[index]  # chain rows come first; a prefill's chain starts with the prompt
        out: list[float] = []
        ids = torch.tensor(targets, dtype=torch.long, device=hidden.device)
        for lo in range(0, len(targets), LOGIT_CHUNK):
            hi = min(lo + LOGIT_CHUNK, len(targets))
            logits = self.model.compute_logits(hidden[first_row + lo : first_row + hi]).float()
            out += logits.log_softmax(-1).gather(-1, ids[lo:hi, None]).squeeze(-1).tolist()
        return out

    @staticmethod
    def _chain_rows(layout: StepLayout, plans: list[SeqPlan]) -> torch.Tensor:
        """Flat rows of all chain tokens (their K/V are kept), in the order of the write slots."""
        return torch.cat([torch.arange(len(p.chain)) + layout.cu_seqlens[i] for i, p in enumerate(plans)])

    def _forward(
        self,
        layout: StepLayout,
        prefix_slots: list[torch.Tensor],
        write_slots: torch.Tensor,
        write_rows: torch.Tensor,
        keep_hidden: bool = False,
    ) -> torch.Tensor:
        """Run the model on the flat batch; float32 logits of the selected rows."""
        device = self.config.device
        self.model.ctx.meta = AttentionMetadata(
            cu_seqlens_q=layout.cu_seqlens,
            context_lens=[s.numel() for s in prefix_slots],
            prefix_slots=[s.to(device) for s in prefix_slots],
            visibility=[v.to(device) for v in layout.visibility],
            write_rows=write_rows.to(device),
            write_slots=write_slots.to(device),
            num_kv_heads=self.model_config.num_key_value_heads,
        )
        mask_rows = layout.mask_rows.to(device) if layout.mask_rows is not None else None
        hidden = self.model(layout.input_ids.to(device), layout.positions.to(device), mask_rows)
        self.last_step = (layout, hidden) if keep_hidden else None  # prompt logprobs (TGI prefill_logprobs)
        return self.model.compute_logits(hidden[layout.logit_rows.to(device)])

    def _advance(self, seq: Sequence, plan: SeqPlan, logits: torch.Tensor, stats: LogitStats,
                 target: torch.Tensor | None = None) -> list[TokenInfo]:
        """Verify seq's candidates, emit tokens until a stop, keep accepted K/V, draft the next ones."""
        verify_logits, groups = split_logits(plan, logits)  # [n + 1, V], [G, g, V]
        candidates = plan.chain[len(plan.chain) - plan.num_candidates :]
        if target is None and not reads_stats(seq.params):
            target = process(verify_logits, seq.params, seq.tokens, candidates)
        if target is None:  # raw greedy: the rows' argmax, from the step's statistics
            accepted, bonus = accept_greedy(stats.argmax(0, plan.num_candidates + 1), candidates)
        elif seq.params.is_greedy:
            accepted, bonus = verify_greedy(target, candidates)
        else:
            q = seq.draft_probs[: plan.num_candidates] if plan.num_candidates else None
            accepted, bonus = verify_sampled(target, candidates, q, seq.generator)
        new_tokens = candidates[:accepted] + [bonus]
        seq.num_cached += len(plan.chain) - plan.num_candidates + accepted  # uncached tokens + accepted
        emitted = self._emit(seq, new_tokens, target, stats, list(range(len(new_tokens))))
        seq.stats.record(plan.num_candidates, accepted, len(emitted))
        self.scheduler.observe(plan.num_candidates, accepted)
        self._draft_next(seq, plan, groups, accepted)
        return emitted

    def _advance_tree(
        self, seq: Sequence, plan: SeqPlan, logits: torch.Tensor, slots: SlotSource, stats: LogitStats,
        target: torch.Tensor | None = None,
    ) -> list[TokenInfo]:
        """Walk seq's candidate tree, emit, move the accepted path's K/V out of scratch, draft the next tree."""
        verify_logits, groups = split_logits(plan, logits)  # [n + 1, V], [G, g, V]
        path, bonus, target = self.speculator.verify(seq, plan, verify_logits, stats, target)
        seq.num_cached += plan.num_uncached
        if path:
            scratch = self._scratch_of(plan, seq, path)
            self._moves.append((scratch, slots.slots(seq.seq_id, seq.num_cached, seq.num_cached + len(path))))
            seq.num_cached += len(path)
        emitted = self._emit(seq, [plan.tree.tokens[i] for i in path] + [bonus], target, stats,
                             [0] + [i + 1 for i in path])
        seq.stats.record(plan.tree.max_depth, len(path), len(emitted))
        if seq.sdsat:
            self.sdsat.draft_next(seq, plan, groups, stats)
        else:
            self.speculator.draft_next(seq, plan, groups, path, stats)
        return emitted

    def _scratch_of(self, plan: SeqPlan, seq: Sequence, path: list[int]) -> torch.Tensor:
        """Scratch slots this step gave to the path's nodes (slots follow the step's tree order)."""
        offset = self._scratch_offsets[seq.seq_id]
        return self.scratch_slots[[offset + i for i in path]]

    def _emit(
        self, seq: Sequence, new_tokens: list[int], target: torch.Tensor | None, stats: LogitStats, rows: list[int]
    ) -> list[TokenInfo]:
        """Append tokens one at a time, stopping exactly where plain decoding would. target: the processed
        rows [a + 1, V] of the new tokens, or None when each token is its logit row's argmax (`rows`), whose
        log-probability the step's statistics hold."""
        if target is None:
            logprobs = [stats.best_logprob(r) for r in rows[: len(new_tokens)]]
        else:
            logprobs = target[: len(new_tokens)].log_softmax(-1)  # [a + 1, V]
        top_n = seq.params.top_n_tokens
        emitted = []
        for i, token in enumerate(new_tokens):
            top = []
            if top_n:
                values, ids = logprobs[i].topk(top_n)
                top = list(zip(ids.tolist(), values.tolist()))
            logprob = logprobs[i] if target is None else float(logprobs[i, token])
            info = TokenInfo(token, logprob, top, self.num_steps)
            seq.tokens.append(token)
            seq.outputs.append(info)
            emitted.append(info)
            seq.finish_reason = self._stop_reason(seq, token)
            if seq.finish_reason:
                break
        return emitted

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        """The finish reason after appending token, if any, in TGI's order: length, EOS, stop ids/strings.

        A stop string counts when the output text ends with it (TGI's StopSequenceCriteria).
        """
        params = seq.params
        if len(seq.output_ids) >= params.max_new_tokens:
            return FINISH_LENGTH
        if token in self.eos_ids and not params.ignore_eos:
            return FINISH_EOS
        if token in params.stop_token_ids:
            return FINISH_STOP
        if params.stop:
            text = self.tokenizer.decode(seq.output_ids)
            if any(text.endswith(s) for s in params.stop):
                return FINISH_STOP
        return None

    def _draft_next(self, seq: Sequence, plan: SeqPlan, groups: torch.Tensor, accepted: int) -> None:
        """Next candidates from the group anchored at the last accepted token.

        When that group was pruned, the nearest earlier group still predicts the
        positions after the new bonus token, from its (accepted - anchor)-th mask on.
        """
        seq.candidates, seq.draft_probs = [], None
        earlier = [j for j, a in enumerate(plan.anchors) if a <= accepted]
        if seq.is_finished or not earlier:
            return
        j = earlier[-1]
        group = groups[j, accepted - plan.anchors[j] :]  # [g', V]
        if group.shape[0]:
            seq.candidates, seq.draft_probs = draft(group, seq.params, seq.generator)


def _warp_together(planned: list[tuple[Sequence, SeqPlan]], logits: torch.Tensor, offsets: list[int]) -> dict:
    """{index in planned: processed verify rows [n + 1, V]} of the step's sampling sequences whose processing
    reads no history (no penalty, no watermark), warped in one call per set of warper settings: one call's
    overhead and one sort per row, not a call per sequence. `apply_warpers` works row by row (each row's
    softmax, sort and cumulative sum are its own), so a row gets the bits it would get alone, whichever
    sequences share the step. Should a shared call fail, its sequences process their own rows (`_advance`)."""
    groups: dict[tuple, list[int]] = {}
    for i, (seq, plan) in enumerate(planned):
        p = seq.params
        if not plan.partial and not p.is_greedy and not p.has_penalties and p.watermark is None:
            groups.setdefault((p.temperature, p.top_k, p.top_p, p.typical_p), []).append(i)
    out = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        sizes = [planned[i][1].num_candidates + 1 for i in members]
        rows = torch.cat([logits[offsets[i] : offsets[i] + n] for i, n in zip(members, sizes)])
        try:
            warped = apply_warpers(rows.float(), planned[members[0]][0].params)
        except Exception as err:  # noqa: BLE001  (each sequence then fails or succeeds alone)
            log.warning("warping %d sequences together failed (%s); each processes its own rows", len(members), err)
            continue
        out.update(zip(members, warped.split(sizes)))
    return out


def _sdsat_kind(planned: list[tuple[Sequence, SeqPlan]]) -> str | None:
    """The rate kind of a step with SDSAT sequences: "sdsat" when any ran its pass, "plain" when nothing
    speculated, None when only SPACE sequences did (a mixed step judges neither way)."""
    speculates = [bool(p.anchors or p.num_candidates) for _, p in planned]
    if any(s for (seq, _), s in zip(planned, speculates) if seq.sdsat):
        return "sdsat"
    return None if any(speculates) else "plain"
