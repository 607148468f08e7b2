"""Property tests of the SPACE layout: visibility and positions follow SPACE.md section 2."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from tgi_space.space import SeqPlan, build_layout, seq_layout

MASK = 999


@st.composite
def plans(draw):
    n = draw(st.integers(0, 6))
    uncached = draw(st.integers(1, 5))
    g = draw(st.integers(0, 6))
    anchors = sorted(draw(st.sets(st.integers(0, n), min_size=1))) if g else []
    chain = draw(st.lists(st.integers(0, 500), min_size=uncached + n, max_size=uncached + n))
    return SeqPlan(chain=chain, num_candidates=n, anchors=anchors, group_size=g, num_cached=draw(st.integers(0, 50)))


def expected_visible(plan: SeqPlan, row: int) -> set[int]:
    """Independent statement of who row may see among the new rows."""
    c = len(plan.chain)
    if row < c:
        return set(range(row + 1))  # chain: causal, never a mask
    j, m = divmod(row - c, plan.group_size)
    anchor = plan.first_verify_row + plan.anchors[j]
    group_start = c + j * plan.group_size
    return set(range(anchor + 1)) | set(range(group_start, group_start + m + 1))


@settings(max_examples=200, deadline=None)
@given(plans())
def test_visibility_and_positions(plan):
    ids, positions, vis = seq_layout(plan, MASK)
    assert len(ids) == len(positions) == plan.num_rows == vis.shape[0]
    for row in range(plan.num_rows):
        seen = set(vis[row].nonzero().flatten().tolist())
        assert seen == expected_visible(plan, row)
        assert positions[row] == plan.num_cached + len(seen) - 1  # visible keys - 1
    assert ids[: len(plan.chain)] == plan.chain
    assert all(i == MASK for i in ids[len(plan.chain) :])


def test_space_md_example_k2():
    """b c1 c2 with groups after b, c1, c2 (k = 2): the layout of SPACE.md, by hand."""
    plan = SeqPlan(chain=[10, 11, 12], num_candidates=2, anchors=[0, 1, 2], group_size=2, num_cached=7)
    ids, positions, vis = seq_layout(plan, MASK)
    assert ids == [10, 11, 12, MASK, MASK, MASK, MASK, MASK, MASK]
    assert positions == [7, 8, 9, 8, 9, 9, 10, 10, 11]
    assert len(ids) == 1 + 2 * (2 + 2)  # 1 + k(k + 2)
    assert vis[4].tolist() == [True, False, False, True, True, False, False, False, False]
    assert vis[8].tolist() == [True, True, True, False, False, False, False, True, True]


@settings(max_examples=50, deadline=None)
@given(st.lists(plans(), min_size=1, max_size=5))
def test_batch_layout_selects_verify_and_mask_rows(batch):
    layout = build_layout(batch, MASK)
    assert layout.cu_seqlens[-1] == layout.input_ids.numel() == sum(p.num_rows for p in batch)
    for i, plan in enumerate(batch):
        rows = layout.logit_rows[layout.logit_offsets[i] : layout.logit_offsets[i + 1]].tolist()
        base = layout.cu_seqlens[i]
        chain_end = base + len(plan.chain)
        assert rows[: plan.num_candidates + 1] == list(range(chain_end - plan.num_candidates - 1, chain_end))
        assert rows[plan.num_candidates + 1 :] == list(range(chain_end, base + plan.num_rows))
