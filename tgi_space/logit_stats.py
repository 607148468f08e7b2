"""The step's logits summarised once for all rows: each row's two best tokens and its logsumexp.

Greedy verification needs each row's argmax, greedy emission the log-probability of that argmax
(its logit minus the row's logsumexp), and mask drafting each group row's best tokens and their
probabilities. One call over the step's logits [R, V] gives all three for every row (the fused CPU
kernel, `logit_stats` in attention/csrc; torch elsewhere), so no sequence runs a reduction over the
vocabulary of its own. A row's figures depend on that row alone. The argmax is the first index of
a tie, as torch's argmax; values, and so log-probabilities, agree with torch's log_softmax to float32
rounding (the kernel's exp has a relative error below 3e-7).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch


@dataclass
class LogitStats:
    """Per logit row of a step: best two token ids and logits, and the row's logsumexp. Rows are
    counted from `first` (a sequence's view of the step's rows, `of`)."""

    top_ids: list[list[int]]  # [R][2]: the argmax, then the runner-up
    top_logits: list[list[float]]  # [R][2]: their raw logits
    lse: list[float]  # [R]: log(sum(exp(row)))
    first: int = 0

    def of(self, first: int) -> LogitStats:
        """The same rows counted from `first` (shares the lists)."""
        return dataclasses.replace(self, first=self.first + first)

    def argmax(self, lo: int, hi: int) -> list[int]:
        """Argmax of rows lo..hi-1."""
        return [ids[0] for ids in self.top_ids[self.first + lo : self.first + hi]]

    def best_logprob(self, row: int) -> float:
        """Log-probability of the row's argmax."""
        row += self.first
        return self.top_logits[row][0] - self.lse[row]

    def top(self, row: int, m: int) -> tuple[list[int], list[float]]:
        """The row's best m <= MAX_TOP tokens and their probabilities, best first."""
        row += self.first
        lse = self.lse[row]
        return self.top_ids[row][:m], [math.exp(v - lse) for v in self.top_logits[row][:m]]


MAX_TOP = 2  # tokens per row LogitStats holds


def reads_stats(params) -> bool:
    """Whether a request's verification and log-probabilities come from the step's statistics alone:
    greedy on the raw logits, and no top-n alternatives asked for."""
    return params.is_raw_greedy and not params.top_n_tokens


def logit_stats(logits: torch.Tensor, kernels=None) -> LogitStats:
    """Statistics of float32 logits [R, V]; `kernels`: the fused CPU extension, when it is built."""
    if kernels is not None and logits.device.type == "cpu":
        ids, values, lse = kernels.logit_stats(logits)
    else:
        ids, values, lse = _torch_stats(logits)
    return LogitStats(ids.tolist(), values.tolist(), lse.tolist())


def _torch_stats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same figures with torch ops (any device): max keeps the first index of a tie, as argmax."""
    best, first = logits.max(-1)
    rest = logits.scatter(-1, first[:, None], float("-inf"))
    runner, second = rest.max(-1)
    ids = torch.stack([first, second], -1).cpu()
    return ids, torch.stack([best, runner], -1).cpu(), logits.logsumexp(-1).cpu()
