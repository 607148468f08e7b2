"""The flash backend's split-and-merge equals the SDPA reference (CPU stand-in for the kernel)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tgi_space.attention.backend import make_backend
from tgi_space.attention.flash import (
    FlashBackend,
    masked_attention_with_lse,
    merge_attention_states,
    torch_varlen_kernel,
)
from tgi_space.attention.metadata import AttentionMetadata
from tgi_space.attention.sdpa import SdpaBackend
from tgi_space.space import SeqPlan, build_layout

H, KVH, D = 4, 2, 16


def random_step(seed: int, device="cpu", dtype=torch.float32):
    """A ragged SPACE step of 3 sequences with cached prefixes, random q/k/v and cache."""
    g = torch.Generator().manual_seed(seed)
    plans = [
        SeqPlan(chain=[5, 6, 7, 8], num_candidates=3, anchors=[0, 1, 2, 3], group_size=3, num_cached=11),
        SeqPlan(chain=list(range(9)), num_candidates=0, anchors=[0], group_size=2, num_cached=0),  # prefill
        SeqPlan(chain=[4], num_candidates=0, anchors=[], group_size=0, num_cached=30),  # plain decode
    ]
    layout = build_layout(plans, 99)
    n = layout.input_ids.numel()
    num_slots = 128
    cache = torch.randn(2, num_slots, KVH, D, generator=g).to(device, dtype)
    perm = torch.randperm(num_slots, generator=g)  # scattered slots, as a paged cache has
    used, prefix, writes = 0, [], []
    for p in plans:
        prefix.append(perm[used : used + p.num_cached].to(device))
        writes.append(perm[used + p.num_cached : used + p.num_cached + len(p.chain)])
        used += p.num_cached + len(p.chain) + 8
    write_rows = torch.cat([torch.arange(len(p.chain)) + layout.cu_seqlens[i] for i, p in enumerate(plans)])
    meta = AttentionMetadata(
        cu_seqlens_q=layout.cu_seqlens, context_lens=[p.num_cached for p in plans], prefix_slots=prefix,
        visibility=[v.to(device) for v in layout.visibility], write_rows=write_rows.to(device),
        write_slots=torch.cat(writes).to(device),
    )
    q = torch.randn(n, H, D, generator=g).to(device, dtype)
    k = torch.randn(n, KVH, D, generator=g).to(device, dtype)
    v = torch.randn(n, KVH, D, generator=g).to(device, dtype)
    return q, k, v, cache, meta


def test_merge_of_two_halves_equals_attention_over_all_keys():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(5, H, D, generator=g), torch.randn(12, KVH, D, generator=g), torch.randn(12, KVH, D, generator=g)
    full, _ = masked_attention_with_lse(q, k, v, torch.ones(5, 12, dtype=torch.bool), 0.25)
    a, lse_a = masked_attention_with_lse(q, k[:7], v[:7], torch.ones(5, 7, dtype=torch.bool), 0.25)
    b, lse_b = masked_attention_with_lse(q, k[7:], v[7:], torch.ones(5, 5, dtype=torch.bool), 0.25)
    torch.testing.assert_close(merge_attention_states(a, lse_a, b, lse_b), full, atol=1e-5, rtol=0)
    # the weights matter: averaging the halves instead is far off
    assert (0.5 * (a + b) - full).abs().max() > 1e-2


def test_flash_split_merge_equals_sdpa_on_cpu():
    q, k, v, cache, meta = random_step(1)
    ref = SdpaBackend().forward(q, k, v, cache.clone(), meta, D**-0.5)
    ours = FlashBackend(kernel=torch_varlen_kernel).forward(q, k, v, cache.clone(), meta, D**-0.5)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_backends_are_chosen_by_name_only():
    assert isinstance(make_backend("sdpa"), SdpaBackend)
    assert isinstance(make_backend("flash"), FlashBackend)  # flash-attn is not imported until a forward
    with pytest.raises(ValueError, match="attention_backend"):
        make_backend("triton")


needs_cuda_flash = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
    reason="needs a CUDA device and flash-attn",
)


@pytest.mark.cuda
@needs_cuda_flash
def test_flash_attn_kernel_matches_sdpa_on_cuda():
    q, k, v, cache, meta = random_step(2, device="cuda", dtype=torch.float16)
    ref = SdpaBackend().forward(q, k, v, cache.clone(), meta, D**-0.5)
    ours = FlashBackend().forward(q, k, v, cache.clone(), meta, D**-0.5)
    torch.testing.assert_close(ours.float(), ref.float(), atol=2e-3, rtol=0)
