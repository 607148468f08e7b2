"""The step's logit statistics (logit_stats.py): the fused CPU kernel against torch's own reductions."""

from __future__ import annotations

import math

import pytest
import torch

from tgi_space.attention import fused
from tgi_space.logit_stats import _torch_stats, logit_stats

needs_kernel = pytest.mark.skipif(fused.available() is not None, reason=f"fused kernel: {fused.available()}")


def _reference(logits: torch.Tensor) -> tuple[list[list[int]], list[float]]:
    """torch: argmax and runner-up ids, and logsumexp."""
    first = logits.argmax(-1)
    second = logits.scatter(-1, first[:, None], float("-inf")).argmax(-1)
    return torch.stack([first, second], -1).tolist(), logits.logsumexp(-1).tolist()


@needs_kernel
@pytest.mark.parametrize("vocab", [2, 15, 16, 17, 100, 8192])
def test_kernel_agrees_with_torch(vocab):
    torch.manual_seed(vocab)
    logits = torch.randn(37, vocab) * 4
    ids, values, lse = fused.kernel().logit_stats(logits)
    want_ids, want_lse = _reference(logits)
    assert ids.tolist() == want_ids
    assert torch.equal(values, logits.gather(-1, ids))
    assert lse.tolist() == pytest.approx(want_lse, rel=1e-6, abs=1e-6)


@needs_kernel
def test_ties_take_the_first_index_as_argmax_does():
    logits = torch.zeros(4, 40)
    logits[1, [5, 30]] = 1.0  # a tie for the best
    logits[2, [7, 9, 33]] = 2.0  # a tie for the best and the runner-up
    logits[3] = float("-inf")
    logits[3, 33] = 2.0  # one finite entry: the runner-up is -inf
    ids, values, lse = fused.kernel().logit_stats(logits)
    assert ids.tolist() == [[0, 1], [5, 30], [7, 9], [33, 0]]
    assert ids[:, 0].tolist() == logits.argmax(-1).tolist()
    assert values[3].tolist() == [2.0, -math.inf]
    assert lse[3].item() == 2.0


@needs_kernel
def test_a_row_gets_the_same_bits_alone_or_in_any_batch():
    torch.manual_seed(0)
    logits = torch.randn(64, 8192) * 3
    ids, values, lse = fused.kernel().logit_stats(logits)
    for r in (0, 17, 63):
        one = fused.kernel().logit_stats(logits[r : r + 1].clone())
        assert torch.equal(one[0][0], ids[r]) and torch.equal(one[1][0], values[r]) and torch.equal(one[2][0], lse[r])


def test_torch_fallback_and_views():
    torch.manual_seed(1)
    logits = torch.randn(6, 50)
    stats = logit_stats(logits)  # no kernel: torch
    want_ids, want_lse = _reference(logits)
    assert stats.top_ids == want_ids
    assert stats.lse == pytest.approx(want_lse, rel=1e-6)
    view = stats.of(2).of(1)  # rows counted from 3
    assert view.argmax(0, 3) == [ids[0] for ids in want_ids[3:6]]
    log_probs = logits.log_softmax(-1)
    assert view.best_logprob(1) == pytest.approx(log_probs[4].max().item(), abs=1e-6)
    ids, probs = view.top(0, 2)
    assert ids == want_ids[3]
    assert probs == pytest.approx(log_probs[3, ids].exp().tolist(), rel=1e-6)
    assert _torch_stats(logits)[0].tolist() == want_ids
