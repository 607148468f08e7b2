"""The SAR-SFT collator: layout, 4D visibility, positions, targets, p_ar (SPACE.md section 1)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from tests.test_train_support import MASK_ID, tiny_llama
from tgi_space.train.collator import IGNORE, SpaceCollator, layout_example, pad_layouts
from tgi_space.train.data import Example, valid_mask_starts


def raw(ids: list[int]) -> Example:
    return Example(ids, [True] * len(ids))


def logits_of(model, layouts) -> torch.Tensor:
    batch = pad_layouts(layouts, pad_id=0)
    with torch.no_grad():
        return model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        ).logits


# ------------------------------------------------------------ worked examples


def test_hand_worked_layout_matches_spec():
    # y = 10..17 (L=8), k=3, s=2: masks see y[0..2) = [10, 11]; mask j at position 2+j predicts y[3+j].
    lay = layout_example(raw(list(range(10, 18))), [2], k=3, mask_id=99)
    assert lay.input_ids == [10, 11, 12, 13, 14, 15, 16, 17, 99, 99, 99]
    assert lay.position_ids == [0, 1, 2, 3, 4, 5, 6, 7, 2, 3, 4]
    assert lay.targets == [11, 12, 13, 14, 15, 16, 17, IGNORE, 13, 14, 15]
    assert lay.offsets == [0] * 8 + [1, 2, 3]
    vis = lay.visible.int()
    assert torch.equal(vis[:8, :8], torch.ones(8, 8, dtype=torch.int).tril())
    assert vis[:8, 8:].sum() == 0  # real tokens never see masks
    expected_mask_rows = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0],
            [1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1],
        ]
    )
    assert torch.equal(vis[8:], expected_mask_rows)
    # position = number of visible keys - 1, for every row
    assert lay.position_ids == (vis.sum(1) - 1).tolist()


def test_two_blocks_see_only_their_prefix_and_themselves():
    lay = layout_example(raw(list(range(20, 30))), [1, 5], k=2, mask_id=99)
    assert lay.input_ids[10:] == [99] * 4
    assert lay.position_ids[10:] == [1, 2, 5, 6]
    assert lay.targets[10:] == [22, 23, 26, 27]
    assert lay.offsets[10:] == [1, 2, 1, 2]
    vis = lay.visible
    assert vis[10:12, 12:].sum() == 0 and vis[12:14, 10:12].sum() == 0  # blocks are independent
    assert vis[12, :5].all() and not vis[12, 5:10].any()
    assert lay.position_ids == (vis.sum(1) - 1).tolist()


def test_supervision_only_on_targets():
    # prompt 4 tokens unsupervised, response 6 tokens supervised; k=2
    ex = Example(list(range(10)), [False] * 4 + [True] * 6)
    assert valid_mask_starts(ex.is_target, 2) == [4, 5, 6, 7]
    lay = layout_example(ex, [], k=2, mask_id=99)
    assert lay.targets == [IGNORE, IGNORE, IGNORE, 4, 5, 6, 7, 8, 9, IGNORE]


def test_valid_starts_need_k_plus_one_targets_and_s_ge_1():
    assert valid_mask_starts([True] * 4, 3) == []
    assert valid_mask_starts([True] * 5, 3) == [1]
    assert valid_mask_starts([True, True, False, True, True, True], 2) == [3]


# ------------------------------------------------------------ the model honours the mask


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_mask_rows_do_not_see_the_future(attn):
    model = tiny_llama(attn)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, MASK_ID, (16,), generator=gen).tolist()
    s, k = 6, 4
    changed = ids[:s] + [(t + 7) % MASK_ID for t in ids[s:]]
    a, b = logits_of(model, [layout_example(raw(x), [s], k, MASK_ID) for x in (ids, changed)])
    assert torch.allclose(a[16:], b[16:], atol=1e-5)  # mask rows unchanged
    assert torch.allclose(a[:s], b[:s], atol=1e-5)
    assert not torch.allclose(a[s:16], b[s:16], atol=1e-3)  # the test can fail: real rows did change


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_masks_never_change_real_token_logits(attn):
    model = tiny_llama(attn)
    ids = list(range(3, 19))
    plain = logits_of(model, [layout_example(raw(ids), [], 3, MASK_ID)])[0]
    lay = layout_example(raw(ids), [4, 9], 3, MASK_ID)
    other = layout_example(raw(ids), [4, 9], 3, MASK_ID)
    other.input_ids[16:19] = [1, 2, 5]  # replace the first block's masks by other tokens
    with_masks, with_other = logits_of(model, [lay, other])
    assert torch.allclose(with_masks[:16], plain, atol=1e-5)
    assert torch.allclose(with_other[:16], plain, atol=1e-5)
    assert torch.allclose(with_masks[19:], with_other[19:], atol=1e-5)  # the second block does not see the first
    assert not torch.allclose(with_masks[16:19], with_other[16:19], atol=1e-3)


def test_padding_is_harmless():
    model = tiny_llama()
    short = layout_example(raw([5, 6, 7, 8, 9]), [1], 2, MASK_ID)
    long = layout_example(raw(list(range(20))), [3], 2, MASK_ID)
    batch = pad_layouts([short, long], pad_id=0)
    assert batch["attention_mask"].shape == (2, 1, 22, 22)
    assert batch["attention_mask"].dtype == torch.float32
    assert (batch["targets"][0, 7:] == IGNORE).all() and (batch["offsets"][0, 7:] == -1).all()
    padded = logits_of(model, [short, long])
    alone = logits_of(model, [short])
    assert torch.isfinite(padded).all()
    assert torch.allclose(padded[0, :7], alone[0], atol=1e-5)


# ------------------------------------------------------------ randomness


def test_p_ar_is_honoured_statistically():
    n, p_ar = 4000, 0.3
    collator = SpaceCollator(k=3, p_ar=p_ar, mask_id=MASK_ID, pad_id=0, num_mask_blocks=2, seed=7)
    ex = raw(list(range(12)))
    num_ar = sum(not collator.choose_starts(ex) for _ in range(n))
    sigma = math.sqrt(n * p_ar * (1 - p_ar))
    assert abs(num_ar - n * p_ar) < 4 * sigma
    assert all(SpaceCollator(3, 0.0, MASK_ID, 0, seed=1).choose_starts(ex) for _ in range(200))
    assert not any(SpaceCollator(3, 1.0, MASK_ID, 0, seed=1).choose_starts(ex) for _ in range(200))


def test_starts_are_uniform_over_valid_starts():
    ex = Example(list(range(14)), [False] * 5 + [True] * 9)  # valid starts 5..10 for k=3
    collator = SpaceCollator(k=3, p_ar=0.0, mask_id=MASK_ID, pad_id=0, num_mask_blocks=1, seed=3)
    counts = Counter(s for _ in range(3000) for s in collator.choose_starts(ex))
    assert set(counts) == {5, 6, 7, 8, 9, 10}
    assert all(abs(c - 500) < 100 for c in counts.values())


def test_blocks_have_distinct_starts_and_batch_keys():
    collator = SpaceCollator(k=2, p_ar=0.0, mask_id=MASK_ID, pad_id=0, num_mask_blocks=3, seed=0)
    batch = collator([raw(list(range(10))), raw(list(range(4)))])
    assert set(batch) == {"input_ids", "attention_mask", "position_ids", "targets", "offsets"}
    # the short example has a single valid start (s=1), so a single block
    assert (batch["offsets"][1] > 0).sum() == 2
    assert (batch["offsets"][0] > 0).sum() == 6


@pytest.mark.parametrize("kwargs", [{"k": 0}, {"p_ar": -0.1}, {"p_ar": 1.5}, {"num_mask_blocks": 0}])
def test_bad_settings_are_refused(kwargs):
    settings = {"k": 3, "p_ar": 0.5, "mask_id": MASK_ID, "pad_id": 0} | kwargs
    with pytest.raises(ValueError):
        SpaceCollator(**settings)


def test_too_short_example_is_refused_by_the_collator():
    collator = SpaceCollator(k=4, p_ar=0.0, mask_id=MASK_ID, pad_id=0)
    with pytest.raises(ValueError, match="k\\+1"):
        collator([raw([1, 2, 3])])
