"""The fused CPU attention kernel (attention/fused.py): the reference's numbers, and a row's bits that
depend on nothing but its own query and visible keys.

References: SDPA over the same visible keys (float32, tolerance), and the kernel itself on a smaller
problem holding only the row's own sequence (bitwise). The SDPA path is the negative control of the
bitwise checks (it rounds a row differently inside a batch; tests/test_batch_invariance.py).
"""

from __future__ import annotations

import pytest
import torch

from tgi_space.attention.fused import FusedBackend, available
from tgi_space.attention.metadata import AttentionMetadata
from tgi_space.attention.sdpa import SdpaBackend

pytestmark = pytest.mark.skipif(available() is not None, reason=f"fused kernel does not build: {available()}")

HEADS, KV_HEADS = 6, 2


def step(ctx: list[int], new: list[int], d: int, dtype, seed: int, chain: bool = True):
    """q/k/v and metadata for sequences with ctx[i] cached keys (distinct slots) and new[i] causal rows."""
    g = torch.Generator().manual_seed(seed)
    n = sum(new)
    slots = sum(ctx) + 8
    cache = torch.randn(2, slots, KV_HEADS, d, generator=g).to(dtype)
    starts = [sum(ctx[:i]) for i in range(len(ctx))]
    vis = [torch.ones(m, m, dtype=torch.bool).tril() if chain else torch.eye(m, dtype=torch.bool) for m in new]
    meta = AttentionMetadata(
        cu_seqlens_q=[sum(new[:i]) for i in range(len(new) + 1)], context_lens=list(ctx),
        prefix_slots=[torch.arange(s, s + c) for s, c in zip(starts, ctx)], visibility=vis,
        write_rows=torch.arange(0), write_slots=torch.arange(0), num_kv_heads=KV_HEADS,
    )
    q = torch.randn(n, HEADS, d, generator=g).to(dtype)
    k = torch.randn(n, KV_HEADS, d, generator=g).to(dtype)
    v = torch.randn(n, KV_HEADS, d, generator=g).to(dtype)
    return q, k, v, cache, meta


@pytest.mark.parametrize("d", [64, 128, 48, 40])  # the unrolled head sizes, the generic path, a partial chunk
@pytest.mark.parametrize("chain", [True, False])
def test_float32_equals_sdpa(d, chain):
    q, k, v, cache, meta = step([0, 5, 70, 33], [9, 1, 20, 3], d, torch.float32, seed=d, chain=chain)
    ref = SdpaBackend().forward(q, k, v, cache.clone(), meta, d**-0.5)
    ours = FusedBackend().forward(q, k, v, cache.clone(), meta, d**-0.5)
    torch.testing.assert_close(ours, ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_strided_views_of_a_fused_projection_give_the_contiguous_result(dtype):
    q, k, v, cache, meta = step([30, 4], [5, 11], 64, dtype, seed=9)
    qkv = torch.cat([q, k, v], dim=1)  # [N, h + 2 kvh, d]: q, k and v are row-strided views of it
    views = qkv[:, :HEADS], qkv[:, HEADS : HEADS + KV_HEADS], qkv[:, HEADS + KV_HEADS :]
    assert not any(t.is_contiguous() for t in views)
    ref = FusedBackend().forward(q, k, v, cache.clone(), meta, 0.125)
    assert torch.equal(FusedBackend().forward(*views, cache.clone(), meta, 0.125), ref)


def test_store_kv_writes_what_index_copy_writes_and_nothing_else():
    from tgi_space.attention.fused import kernel

    g = torch.Generator().manual_seed(10)
    qkv = torch.randn(7, HEADS + 2 * KV_HEADS, 64, generator=g).bfloat16()
    k, v = qkv[:, HEADS : HEADS + KV_HEADS], qkv[:, HEADS + KV_HEADS :]  # strided views, as in the model
    cache = torch.randn(2, 20, KV_HEADS, 64, generator=g).bfloat16()
    rows, slots = torch.tensor([0, 3, 6, 4]), torch.tensor([19, 2, 7, 11])
    ref = cache.clone()
    ref[0].index_copy_(0, slots, k.index_select(0, rows))
    ref[1].index_copy_(0, slots, v.index_select(0, rows))
    kernel().store_kv(k, v, cache, rows, slots)
    assert torch.equal(cache, ref)
    with pytest.raises(RuntimeError, match="out of range"):
        kernel().store_kv(k, v, cache, rows, torch.tensor([19, 2, 7, 20]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("ctx", [5, 37, 64, 90, 111, 128])
def test_hidden_keys_between_visible_ones_change_no_bit(dtype, ctx):
    """A tree node sees its ancestors, not its siblings: the same row computed with its visible keys
    contiguous (a chain), with hidden rows between them (a tree), and with its ancestors cached (the
    plain-decoding case) must agree bit for bit, wherever its keys fall in a vector or a tile."""
    g = torch.Generator().manual_seed(ctx)
    d, depth, hidden = 64, 21, 2  # the node has 20 ancestors in the step; 2 hidden siblings before each
    cache = torch.randn(2, ctx + depth, KV_HEADS, d, generator=g).to(dtype)
    q_row = torch.randn(1, HEADS, d, generator=g).to(dtype)
    kv = cache[:, ctx : ctx + depth].clone()  # the step's chain keys/values: ancestors then the node

    def run(order: list[int], vis_rows, num_ctx: int):
        n = len(order)
        k_new = torch.stack([kv[0, i] if i >= 0 else torch.randn(KV_HEADS, d, generator=g).to(dtype) for i in order])
        v_new = torch.stack([kv[1, i] if i >= 0 else torch.randn(KV_HEADS, d, generator=g).to(dtype) for i in order])
        q = torch.randn(n, HEADS, d, generator=g).to(dtype)
        q[-1] = q_row[0]
        meta = AttentionMetadata(
            cu_seqlens_q=[0, n], context_lens=[num_ctx], prefix_slots=[torch.arange(num_ctx)], visibility=[vis_rows],
            write_rows=torch.arange(0), write_slots=torch.arange(0), num_kv_heads=KV_HEADS,
        )
        return FusedBackend().forward(q, k_new, v_new, cache, meta, 0.125)[-1]

    chain = list(range(depth))
    tree = [j for i in chain for j in ([-1] * hidden if 0 < i else []) + [i]]  # siblings before each ancestor
    tree_vis = torch.zeros(len(tree), len(tree), dtype=torch.bool)
    tree_vis[-1] = torch.tensor([i >= 0 for i in tree])
    tree_vis |= torch.eye(len(tree), dtype=torch.bool)
    as_chain = run(chain, torch.ones(depth, depth, dtype=torch.bool).tril(), ctx)
    as_tree = run(tree, tree_vis, ctx)
    cached = run([depth - 1], torch.ones(1, 1, dtype=torch.bool), ctx + depth - 1)  # ancestors in the cache
    assert torch.equal(as_tree, as_chain)
    assert torch.equal(cached, as_chain)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_close_to_float32(dtype):
    q, k, v, cache, meta = step([40, 3], [4, 17], 64, torch.float32, seed=3)
    ref = SdpaBackend().forward(q, k, v, cache.clone(), meta, 0.125)
    ours = FusedBackend().forward(q.to(dtype), k.to(dtype), v.to(dtype), cache.to(dtype), meta, 0.125)
    torch.testing.assert_close(ours.float(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_row_has_the_same_bits_alone_and_in_any_batch(dtype):
    """Sequence 1's rows computed with three other sequences around it, and with it alone."""
    ctx, new = [17, 45, 130, 2], [1, 21, 5, 36]
    q, k, v, cache, meta = step(ctx, new, 64, dtype, seed=7)
    together = FusedBackend().forward(q, k, v, cache, meta, 0.125)
    rows = slice(meta.cu_seqlens_q[1], meta.cu_seqlens_q[2])
    alone_meta = AttentionMetadata(
        cu_seqlens_q=[0, new[1]], context_lens=[ctx[1]], prefix_slots=[meta.prefix_slots[1]],
        visibility=[meta.visibility[1]], write_rows=torch.arange(0), write_slots=torch.arange(0),
        num_kv_heads=KV_HEADS,
    )
    alone = FusedBackend().forward(q[rows], k[rows], v[rows], cache, alone_meta, 0.125)
    assert torch.equal(together[rows], alone)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_key_read_from_the_cache_or_from_the_step_gives_the_same_bits(dtype):
    """Plain decoding reads token t-1's K/V from the cache; a speculative step may have it as a new row.
    The last row of a 6-row chain must equal the same row stepped alone after the first 5 were cached."""
    q, k, v, cache, meta = step([50], [6], 64, dtype, seed=11)
    chain = FusedBackend().forward(q, k, v, cache.clone(), meta, 0.125)
    cached = cache.clone()
    cached[0, 50:55], cached[1, 50:55] = k[:5], v[:5]  # the first 5 rows' K/V now in slots 50..54
    decode = AttentionMetadata(
        cu_seqlens_q=[0, 1], context_lens=[55], prefix_slots=[torch.arange(55)],
        visibility=[torch.ones(1, 1, dtype=torch.bool)], write_rows=torch.arange(0), write_slots=torch.arange(0),
        num_kv_heads=KV_HEADS,
    )
    alone = FusedBackend().forward(q[5:], k[5:], v[5:], cached, decode, 0.125)
    assert torch.equal(chain[5:], alone)


def test_the_thread_count_does_not_change_a_bit():
    q, k, v, cache, meta = step([100, 7, 60], [12, 30, 1], 64, torch.bfloat16, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = FusedBackend().forward(q, k, v, cache, meta, 0.125)
        torch.set_num_threads(max(2, threads))
        many = FusedBackend().forward(q, k, v, cache, meta, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_rms_norm_kernel_equals_the_module_and_is_row_wise():
    from tgi_space.attention.fused import kernel
    from tgi_space.model.llama import RMSNorm

    g = torch.Generator().manual_seed(2)
    norm = RMSNorm(384, 1e-5)
    norm.weight.data = torch.randn(384, generator=g)
    x = torch.randn(37, 384, generator=g) * 3
    torch.testing.assert_close(kernel().rms_norm(x, norm.weight.data, norm.eps), norm(x), atol=1e-5, rtol=1e-5)
    xb, wb = x.bfloat16(), norm.weight.data.bfloat16()
    ours = kernel().rms_norm(xb, wb, norm.eps)
    torch.testing.assert_close(ours.float(), norm.to(torch.bfloat16)(xb).float(), atol=0.05, rtol=0.02)
    alone = torch.cat([kernel().rms_norm(xb[r : r + 1], wb, norm.eps) for r in range(37)])
    assert torch.equal(ours, alone)


def test_residual_add_then_norm_is_a_torch_add_then_the_module():
    from tgi_space.attention.fused import kernel
    from tgi_space.model.llama import RMSNorm

    g = torch.Generator().manual_seed(6)
    norm = RMSNorm(384, 1e-6).to(torch.bfloat16)
    norm.weight.data = torch.randn(384, generator=g).bfloat16()
    x, delta = (torch.randn(21, 384, generator=g) * 3).bfloat16(), torch.randn(21, 384, generator=g).bfloat16()
    summed = x + delta  # torch's bf16 add: float32 sum, one rounding
    stream = x.clone()
    ours = kernel().rms_norm(stream, norm.weight.data, norm.eps, delta)
    assert torch.equal(stream, summed)  # the residual stream, updated in place
    assert torch.equal(ours, kernel().rms_norm(summed, norm.weight.data, norm.eps))
    torch.testing.assert_close(ours.float(), norm(summed).float(), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_kernel_equals_silu_times_up_and_is_row_wise(dtype):
    from tgi_space.attention.fused import kernel

    g = torch.Generator().manual_seed(8)
    x = (torch.randn(13, 2 * 200, generator=g) * 4).to(dtype)  # 200: a tail past the last 16 lanes
    x[0, :5] = torch.tensor([0.0, -90.0, 90.0, -1e-3, 1e-3])  # zero, saturation, tiny inputs
    gate, up = x.chunk(2, dim=-1)
    ref = torch.nn.functional.silu(gate) * up
    ours = kernel().swiglu(x)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(ours, ref, **tol)
    assert torch.equal(ours, torch.cat([kernel().swiglu(x[r : r + 1]) for r in range(13)]))


def test_rotary_kernel_equals_the_reference_rotation_on_a_strided_view():
    from tgi_space.attention.fused import kernel
    from tgi_space.model.rotary import RopeTables

    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(9, (6 + 2 + 2) * 64, generator=g)
    qk = qkv[:, : 8 * 64].view(9, 8, 64)  # q and k heads of a fused projection: rows are strided
    angles = torch.rand(9, 32, generator=g) * 50
    ref = RopeTables(angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)).rotate(qk)
    ours = kernel().rotary(qk, angles.cos(), angles.sin())
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    alone = torch.cat([kernel().rotary(qk[r : r + 1], angles.cos()[r : r + 1], angles.sin()[r : r + 1])
                       for r in range(9)])
    assert torch.equal(ours, alone)
