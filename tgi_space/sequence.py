"""A request in flight: its tokens, cache position, SPACE candidates and statistics."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tgi_space.sampling import SamplingParams


@dataclass
class SeqStats:
    """Per-request speculation figures."""

    num_steps: int = 0  # forward passes this request took part in
    tokens_per_step: list[int] = field(default_factory=list)  # emitted tokens of each step
    drafted_by_position: list[int] = field(default_factory=list)  # [k] candidates verified at position i+1
    accepted_by_position: list[int] = field(default_factory=list)  # [k] of those accepted
    prompt_logprobs: list[float | None] | None = None  # with params.prompt_logprobs: each prompt token's, first None
    cached_prompt_tokens: int = 0  # prompt tokens read from the prefix cache instead of computed (first admission)

    def record(self, num_candidates: int, num_accepted: int, num_emitted: int) -> None:
        """Add one step's verification outcome."""
        self.num_steps += 1
        self.tokens_per_step.append(num_emitted)
        grow = num_candidates - len(self.drafted_by_position)
        if grow > 0:
            self.drafted_by_position += [0] * grow
            self.accepted_by_position += [0] * grow
        for i in range(num_candidates):
            self.drafted_by_position[i] += 1
            self.accepted_by_position[i] += int(i < num_accepted)

    @property
    def mean_tokens_per_step(self) -> float:
        """Emitted tokens per forward pass (1.0 for plain decoding)."""
        return sum(self.tokens_per_step) / max(1, self.num_steps)


@dataclass
class TokenInfo:
    """One emitted token with its log-probability and top alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # [(id, logprob)] best first, top_n_tokens long
    step: int  # index of the forward step that produced it


class Sequence:
    """Lifecycle: waiting -> running (num_cached grows) -> finished (blocks freed)."""

    def __init__(
        self,
        seq_id: int,
        prompt_ids: list[int],
        params: SamplingParams,
        speculate: bool,
        generator: torch.Generator | None,
        sdsat: bool = False,
    ) -> None:
        self.seq_id = seq_id
        self.params = params
        self.speculate = speculate or sdsat
        self.sdsat = sdsat  # speculates with SDSAT's two passes (draft_tree set: the verify pass is next)
        self.generator = generator  # per-request RNG, None when greedy
        self.tokens: list[int] = list(prompt_ids)  # prompt then output
        self.num_prompt = len(prompt_ids)
        self.num_cached = 0  # tokens whose K/V are in the cache; the rest are fed next step
        self.candidates: list[int] = []  # drafted tokens for the positions after tokens[-1]
        self.draft_probs: torch.Tensor | None = None  # [len(candidates), V] when sampling
        self.outputs: list[TokenInfo] = []
        self.finish_reason: str | None = None
        self.error: str | None = None  # set when this request alone failed inside a step
        self.draft_tree = None  # DraftTree for the next step (planned speculation), None until first drafted
        self.suffix_index = None  # SuffixIndex over self.tokens, built by the suffix drafter
        self.suffix_matched = False  # the suffix drafter's last tree was not empty
        self.mask_expect = None  # what the mask drafts in draft_tree were predicted to add (Speculator)
        self.stats = SeqStats()

    @property
    def output_ids(self) -> list[int]:
        """Generated token ids."""
        return self.tokens[self.num_prompt :]

    @property
    def is_finished(self) -> bool:
        """Whether a stop condition was met."""
        return self.finish_reason is not None

    def reset_cache(self) -> None:
        """Forget the cache (after preemption): the next step re-feeds every token."""
        self.num_cached = 0
        self.candidates = []
        self.draft_probs = None
        self.draft_tree = None
        self.mask_expect = None
