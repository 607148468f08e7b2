"""Sampling parameters, logits processing, and the acceptance rules shared by AR and SPACE."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from tgi_space.watermark import Watermark

FINISH_LENGTH = "length"
FINISH_EOS = "eos_token"
FINISH_STOP = "stop_sequence"

# Logits are divided by temperature and by repetition_penalty (and multiplied by the latter), in
# float32; outside [MIN_SCALE, MAX_SCALE] they overflow to inf and softmax turns them into NaN.
MIN_SCALE = 1e-4
MAX_SCALE = 1e4
FLOAT_FIELDS = ("temperature", "top_p", "typical_p", "repetition_penalty", "frequency_penalty")


@dataclass
class SamplingParams:
    """What one request asks of decoding (TGI's names and defaults where they exist)."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    top_n_tokens: int = 0
    watermark: Watermark | None = None  # TGI's green-list watermark, applied before penalties
    prompt_logprobs: bool = False  # also report each prompt token's log-probability (TGI's decoder_input_details)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field and its allowed range (non-finite floats included)."""
        for name in FLOAT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens", ">= 1", self.max_new_tokens),
            (self.temperature == 0 or MIN_SCALE <= self.temperature <= MAX_SCALE, "temperature",
             f"0 (greedy) or in [{MIN_SCALE:g}, {MAX_SCALE:g}]", self.temperature),
            (0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p),
            (0 < self.typical_p <= 1, "typical_p", "in (0, 1]", self.typical_p),
            (self.top_k >= 0, "top_k", ">= 0 (0 disables)", self.top_k),
            (MIN_SCALE <= self.repetition_penalty <= MAX_SCALE, "repetition_penalty",
             f"in [{MIN_SCALE:g}, {MAX_SCALE:g}]", self.repetition_penalty),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "in [-2, 2]", self.frequency_penalty),
            (0 <= self.top_n_tokens <= 20, "top_n_tokens", "in [0, 20]", self.top_n_tokens),
        ]
        for ok, name, allowed, value in checks:
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {value!r}")

    @property
    def is_greedy(self) -> bool:
        """Greedy unless sampling is asked for or a warper is set (TGI's rule)."""
        if self.temperature == 0:
            return True
        has_warper = self.temperature != 1.0 or self.top_k > 0 or self.top_p < 1.0 or self.typical_p < 1.0
        return not (self.do_sample or has_warper)

    @property
    def is_raw_greedy(self) -> bool:
        """Greedy on the model's own logits (no penalty, no watermark): each token is its row's argmax,
        taken with the step's logit statistics for all rows at once (logit_stats.py)."""
        return self.is_greedy and not self.has_penalties and self.watermark is None

    @property
    def has_penalties(self) -> bool:
        """Whether logits depend on the token history."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Repetition (HF/CTRL style) and frequency penalties. logits, counts: [R, V]."""
    if params.repetition_penalty != 1.0:
        seen = counts > 0
        penalised = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if params.frequency_penalty != 0.0:
        logits = logits - params.frequency_penalty * counts.to(logits.dtype)
    return logits


def apply_warpers(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p and typical-p, in that order (as TGI). logits: [R, V]."""
    if params.is_greedy:
        return logits
    logits = logits / params.temperature if params.temperature != 1.0 else logits
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        logits = _top_p(logits, params.top_p)
    if params.typical_p < 1.0:
        logits = _typical_p(logits, params.typical_p)
    return logits


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p: a token is dropped when the tokens
    ranked above it hold top_p already; tokens as likely as the least likely kept one are kept too (a tie at
    the boundary is kept whole, not cut by sort order). Only the sorted probabilities are needed, not the
    order: on the CPU numpy sorts them (SIMD, ~65 us for 8,192 float32) where torch.sort, which also builds
    the permutation, takes ~650 us."""
    probs = logits.softmax(-1)  # [R, V]
    if probs.device.type == "cpu":
        ranked = torch.from_numpy(np.ascontiguousarray(np.sort(probs.numpy(), axis=-1)[..., ::-1]))
    else:
        ranked = probs.sort(dim=-1, descending=True).values  # [R, V], most likely first
    cumulative = ranked.cumsum(-1)
    above = torch.cat([torch.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], dim=-1)  # mass ranked above
    num_kept = (above < top_p).sum(-1, keepdim=True)  # >= 1: nothing is ranked above the first
    threshold = ranked.gather(-1, num_kept - 1)  # [R, 1] the least likely kept probability
    return logits.masked_fill(probs < threshold, float("-inf"))


def _typical_p(logits: torch.Tensor, mass: float) -> torch.Tensor:
    """Locally typical sampling: keep tokens closest to the entropy until `mass` is covered."""
    logp = logits.log_softmax(-1)
    p = logp.exp()
    entropy = -(p * logp.nan_to_num(neginf=0.0)).sum(-1, keepdim=True)
    shifted = (entropy + logp).abs()
    sorted_shift, order = shifted.sort(dim=-1)
    cumulative = p.gather(-1, order).cumsum(-1)
    drop_sorted = (cumulative - p.gather(-1, order)) >= mass
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def token_counts(history: list[int], extra: list[int], num_rows: int, vocab: int, device) -> torch.Tensor:
    """Token counts [num_rows, V]: row r counts `history` plus the first r tokens of `extra`."""
    counts = torch.zeros(num_rows, vocab, dtype=torch.int32, device=device)
    if history:
        counts += torch.bincount(torch.tensor(history, device=device), minlength=vocab).to(torch.int32)
    for r in range(1, num_rows):
        counts[r:, extra[r - 1]] += 1
    return counts


def process(
    logits: torch.Tensor, params: SamplingParams, history: list[int], extra: list[int] = ()
) -> torch.Tensor:
    """Processed float32 logits [R, V]; row r's history is `history + extra[:r]`."""
    logits = logits.float()
    if params.watermark is not None:
        logits = params.watermark.apply(logits, history, list(extra))
    if params.has_penalties:
        counts = token_counts(history, list(extra), logits.shape[0], logits.shape[-1], logits.device)
        logits = apply_penalties(logits, counts, params)
    return apply_warpers(logits, params)


def verify_greedy(target_logits: torch.Tensor, candidates: list[int]) -> tuple[int, int]:
    """(accepted count, bonus token). target_logits [n + 1, V] checks candidates [n] in order."""
    return accept_greedy(target_logits.argmax(-1).tolist(), candidates)


def accept_greedy(targets: list[int], candidates: list[int]) -> tuple[int, int]:
    """(accepted count, bonus token) from the argmax of each verify row, targets [n + 1]."""
    accepted = 0
    while accepted < len(candidates) and candidates[accepted] == targets[accepted]:
        accepted += 1
    return accepted, targets[accepted]


def verify_sampled(
    target_logits: torch.Tensor,  # [n + 1, V] processed target logits
    candidates: list[int],  # [n] drafted tokens
    draft_probs: torch.Tensor | None,  # [n, V] distributions the candidates were drawn from
    generator: torch.Generator,
) -> tuple[int, int]:
    """Speculative sampling: accept c with prob min(1, p/q); on rejection draw from (p - q)+."""
    p = target_logits.softmax(-1)
    n = len(candidates)
    if n:
        coins = torch.rand(n, generator=generator, device=p.device).tolist()
    for i in range(n):
        c = candidates[i]
        p_c, q_c = p[i, c].item(), draft_probs[i, c].item()
        if q_c > 0 and coins[i] * q_c < p_c:  # u < p/q
            continue
        residual = (p[i] - draft_probs[i]).clamp_min(0)
        if residual.sum() <= 0:  # p == q: any draw from p is exact
            residual = p[i]
        return i, sample(residual, generator)
    return n, sample(p[n], generator)


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One draw from unnormalised non-negative weights [V] (`sample_many`)."""
    return sample_many(probs, 1, generator)[0]


def sample_many(probs: torch.Tensor, num: int, generator: torch.Generator) -> list[int]:
    """`num` i.i.d. draws from unnormalised non-negative weights [V]: for each, the first token whose cumulative
    weight (float64) exceeds a uniform point of the total, so only a token of positive weight can be drawn.
    One random number per draw. On the CPU, for 8,192 tokens, one draw takes ~45 us where torch.multinomial
    takes ~300 us (for a single draw it uses an exponential per token); for several draws with replacement
    torch.multinomial is faster (~17 us for 8), so SDSAT's sampled trees keep it."""
    cdf = probs.double().cumsum(-1)
    total = float(cdf[-1])
    if not 0.0 < total < math.inf:  # NaN too: every comparison with it is false
        raise ValueError(f"sampling: the token weights sum to {total}, not a positive finite number")
    points = torch.rand(num, dtype=torch.float64, generator=generator, device=generator.device).to(cdf.device) * total
    tokens = torch.searchsorted(cdf, points, right=True).tolist()
    if max(tokens) == cdf.shape[-1]:  # a point rounded up to the total: the last token of positive weight
        last = int(torch.nonzero(probs > 0)[-1])
        tokens = [min(t, last) for t in tokens]
    return tokens


def draft(group_logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None):
    """Candidates from a mask group's logits [g, V]: (tokens, their draft distributions or None)."""
    if params.is_greedy:
        return group_logits.argmax(-1).tolist(), None
    probs = apply_warpers(group_logits.float(), params).softmax(-1)  # [g, V]
    return [sample(row, generator) for row in probs], probs
