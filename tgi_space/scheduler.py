"""Continuous batching: which sequences run this step, with how many candidates, and their blocks."""

from __future__ import annotations

from collections import deque

from tgi_space.config import SpacePolicy
from tgi_space.kv_cache import BlockManager
from tgi_space.sequence import Sequence
from tgi_space.space import SeqPlan


class Scheduler:
    """Admits waiting sequences within the token budget and plans each running one's rows."""

    def __init__(
        self,
        block_manager: BlockManager,
        policy: SpacePolicy,
        k_max: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        reserve: int = 0,
        sdsat_reserve: int = 0,
    ) -> None:
        self.blocks = block_manager
        self.reserve = reserve  # slots a speculating sequence keeps free for a step's accepted tree path
        self.sdsat_reserve = sdsat_reserve  # the same for an SDSAT sequence (its verify pass's longest path)
        self.policy = policy
        self.k_max = k_max
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.acceptance = [1.0] * (k_max + 1)  # running mean of P(a == i), for group pruning
        self.last_k = 0
        self.num_preemptions = 0  # sequences sent back to recompute for lack of blocks
        self._registered: set[int] = set()  # running sequences whose computed prompt is in the prefix cache
        self._budget = max_num_batched_tokens  # prompt tokens this step may still compute (`schedule`)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence."""
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or cancelled sequence and return its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def has_work(self) -> bool:
        """Whether any sequence is waiting or running."""
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, SeqPlan]]:
        """Plans for this step: running sequences first (they hold blocks), then admissions. Uncomputed prompt
        tokens count against max_num_batched_tokens: a prompt beyond what is left of it is computed in chunks
        over the next steps (partial plans: K/V only), the running ones' first."""
        k = self.policy.choose_k(sum(s.speculate for s in self.running), 0, self.k_max)
        self.last_k = k
        self._register_prompts()
        self._budget = self.max_num_batched_tokens
        planned = self._plan_running(k)
        planned += self._admit(k, len(planned))
        return planned

    def _plan_running(self, k: int) -> list[tuple[Sequence, SeqPlan]]:
        """Grow each running sequence's blocks for its step, oldest first."""
        planned = []
        for seq in list(self.running):
            if seq not in self.running:  # preempted to make room for an older one
                continue
            plan = self._fit(seq, k if seq.speculate else 0, self._take_chunk(seq))
            if plan is not None:
                self.blocks.append(seq.seq_id, self._needed(seq, plan))
                planned.append((seq, plan))
        return planned

    def _take_chunk(self, seq: Sequence) -> int | None:
        """Prompt tokens seq computes this step when that is not all it has uncomputed (None: all of them, or
        a decode step), at least one; taken from this step's budget."""
        left = len(seq.tokens) - seq.num_cached
        if left <= 1:
            return None
        n = max(1, min(left, self._budget))
        self._budget = max(0, self._budget - n)
        return n if n < left and self._chunkable(seq) else None

    @staticmethod
    def _chunkable(seq: Sequence) -> bool:
        """Whether seq's prompt may be computed in chunks: not while its prompt log-probabilities are to come
        (the engine reads them off one prefill of the whole prompt)."""
        return not (seq.params.prompt_logprobs and seq.stats.prompt_logprobs is None)

    def _fit(self, seq: Sequence, k: int, chunk: int | None = None) -> SeqPlan | None:
        """seq's plan (its next `chunk` prompt tokens only, when given) if the cache can hold its chain: fewer
        candidates first, then preempt the newest."""
        plan = self._plan(seq, k) if chunk is None else chunk_plan(seq, chunk)
        if chunk is None and not self._fits(seq, plan):
            plan = self._plan(seq, k, max_candidates=0)  # masks need no cache slots
        while not self._fits(seq, plan):
            victim = self.running.pop()
            self._release(victim)
            victim.reset_cache()
            self.waiting.appendleft(victim)
            self.num_preemptions += 1
            if victim is seq:
                return None
        return plan

    def _fits(self, seq: Sequence, plan: SeqPlan) -> bool:
        return self.blocks.can_append(seq.seq_id, self._needed(seq, plan))

    def _needed(self, seq: Sequence, plan: SeqPlan) -> int:
        """Tokens seq's blocks must hold after this step: its chain, plus the tree reserve when speculating."""
        remaining = seq.params.max_new_tokens - len(seq.output_ids)
        most = max(self.reserve, self.sdsat_reserve) if seq.sdsat else self.reserve
        reserve = min(most, max(0, remaining - 1)) if seq.speculate else 0
        return plan.num_cached + len(plan.chain) + reserve

    def _admit(self, k: int, num_running: int) -> list[tuple[Sequence, SeqPlan]]:
        """Prefill waiting sequences while tokens, sequence slots and blocks allow."""
        planned = []
        while self.waiting and num_running + len(planned) < self.max_num_seqs and self._budget > 0:
            seq = self.waiting[0]
            prefix = self._cached_prefix(seq)
            seq.num_cached = len(prefix) * self.blocks.block_size  # the first step computes the rest
            plan = self._plan(seq, k if seq.speculate else 0)
            # over the budget: computed in chunks, or whole (prompt log-probabilities) as the step's first admission
            fits = len(plan.chain) <= self._budget or self._chunkable(seq) or not planned
            if not fits or not self.blocks.can_allocate(self._needed(seq, plan), prefix):
                seq.num_cached = 0
                break
            self.waiting.popleft()
            self.blocks.allocate(seq.seq_id, self._needed(seq, plan), prefix)  # for the whole prompt
            if not seq.output_ids:  # (a preempted request's recompute reads generated tokens too: not prompt)
                seq.stats.cached_prompt_tokens = seq.num_cached
            self.running.append(seq)
            if len(plan.chain) > self._budget and self._chunkable(seq):
                plan = chunk_plan(seq, self._budget)
            self._budget = max(0, self._budget - len(plan.chain))
            planned.append((seq, plan))
        return planned

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """The prefix cache's blocks for seq's tokens (its prompt; a preempted request's generated tokens too);
        none when it asks for its prompt's log-probabilities (those come from computing every prompt token)."""
        if seq.params.prompt_logprobs:
            return []
        return self.blocks.cached_prefix(seq.tokens)

    def _register_prompts(self) -> None:
        """Key the prompt blocks of running sequences whose prompts are computed, for later prompts."""
        for seq in self.running:
            self._register(seq)

    def _register(self, seq: Sequence) -> None:
        if seq.seq_id not in self._registered and seq.num_cached >= seq.num_prompt and seq.error is None:
            self.blocks.register_computed(seq.seq_id, seq.tokens[: seq.num_prompt])
            self._registered.add(seq.seq_id)

    def _release(self, seq: Sequence) -> None:
        """Return seq's blocks. What it computed stays in the prefix cache, generated tokens included (their K/V
        have the bits a prefill of them gives: batch-invariant kernels), so the next turn of a chat, whose prompt
        repeats this one and its answer, or a preempted request's recompute reads it. Not a failed request's."""
        if seq.seq_id in self.blocks.block_tables and seq.error is None:
            self.blocks.register_computed(seq.seq_id, seq.tokens[: seq.num_cached])
        self._registered.discard(seq.seq_id)
        self.blocks.free(seq.seq_id)

    def _plan(self, seq: Sequence, k: int, max_candidates: int | None = None) -> SeqPlan:
        return plan_sequence(seq, k, self._anchors, max_candidates)

    def _anchors(self, n: int) -> list[int]:
        """Candidate counts after which a mask group goes: all, or when pruning, 0 (a fallback
        for every outcome) plus the likeliest last-accepted counts."""
        if self.policy.prune_groups is None or self.policy.prune_groups > n:
            return list(range(n + 1))
        ranked = sorted(range(1, n + 1), key=lambda a: -self.acceptance[a])
        return [0] + sorted(ranked[: self.policy.prune_groups - 1])

    def observe(self, num_candidates: int, num_accepted: int) -> None:
        """Update the running acceptance-count frequencies used for pruning."""
        if num_candidates == self.k_max:
            for a in range(self.k_max + 1):
                self.acceptance[a] = 0.95 * self.acceptance[a] + 0.05 * float(a == num_accepted)


def chunk_plan(seq: Sequence, n: int) -> SeqPlan:
    """The next n uncomputed tokens of seq's prompt, nothing else: their K/V are written; no logits, nothing
    emitted or drafted (the step after computes the rest)."""
    chain = seq.tokens[seq.num_cached : seq.num_cached + n]
    return SeqPlan(chain=chain, num_candidates=0, anchors=[], group_size=0, num_cached=seq.num_cached, partial=True)


def plan_sequence(seq: Sequence, k: int, anchors=None, max_candidates: int | None = None) -> SeqPlan:
    """Rows of seq: its uncached tokens, up to k candidates, and mask groups of size k after them."""
    remaining = seq.params.max_new_tokens - len(seq.output_ids)
    n = min(k, len(seq.candidates), max(0, remaining - 1))
    n = n if max_candidates is None else min(n, max_candidates)
    chain = seq.tokens[seq.num_cached :] + seq.candidates[:n]
    g = k if remaining > 1 else 0
    groups = (anchors(n) if anchors else list(range(n + 1))) if g else []
    return SeqPlan(chain=chain, num_candidates=n, anchors=groups, group_size=g, num_cached=seq.num_cached)
