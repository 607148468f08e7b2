"""CUDA attention: the cached prefix through flash-attn's varlen kernel, the new rows in torch, merged by LSE.

A new row's attention splits into (a) the cached prefix, which every new row sees
whole, so a plain non-causal varlen kernel does it, and (b) the new rows among
themselves under their SPACE visibility mask, at most `1 + k(k+2)` rows per
sequence, done in torch. Each part returns its output and log-sum-exp; the merge
is exact. flashinfer's custom-mask prefill would do both in one kernel; flash-attn
was chosen because TGI's images ship it and the split keeps the mask logic in
readable torch that the CPU tests cover.

The prefix is gathered from the paged cache into a contiguous buffer (one copy
per layer) so any block size works; flash-attn's paged `block_table` path needs
blocks of 256.
"""

from __future__ import annotations

from itertools import accumulate
from typing import Callable

import torch

from tgi_space.attention.backend import write_kv
from tgi_space.attention.metadata import AttentionMetadata

# (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale) -> (out [Nq, h, d], lse [h, Nq])
VarlenKernel = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def merge_attention_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """Combine two softmax-attention partials over disjoint key sets. out [n, h, d], lse [n, h]."""
    lse = torch.logaddexp(lse_a, lse_b)  # [n, h]
    w_a = torch.exp(lse_a - lse).unsqueeze(-1)
    w_b = torch.exp(lse_b - lse).unsqueeze(-1)
    return (out_a.float() * w_a + out_b.float() * w_b).to(out_a.dtype)


def masked_attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [n, h, d] over k/v [m, kvh, d] where mask [n, m]; (out [n, h, d], lse [n, h])."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,mhd->hnm", q.float(), k.float()) * scale  # [h, n, m]
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [h, n]
    probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)
    out = torch.einsum("hnm,mhd->nhd", probs, v.float())
    return out.to(q.dtype), lse.transpose(0, 1)


def torch_varlen_kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale):
    """Pure-torch stand-in of flash-attn's non-causal varlen kernel, for CPU tests."""
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    for i in range(len(cu_seqlens_q) - 1):
        qs = slice(int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1]))
        ks = slice(int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1]))
        mask = torch.ones(qs.stop - qs.start, ks.stop - ks.start, dtype=torch.bool, device=q.device)
        out[qs], seq_lse = masked_attention_with_lse(q[qs], k[ks], v[ks], mask, scale)
        lse[:, qs] = seq_lse.transpose(0, 1)
    return out, lse


def flash_attn_kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale):
    """flash-attn 2's varlen kernel, imported on first use."""
    from flash_attn import flash_attn_varlen_func

    out, lse, _ = flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        softmax_scale=scale, causal=False, return_attn_probs=True,
    )
    return out, lse


class FlashBackend:
    """Prefix via a varlen kernel (flash-attn on CUDA), new rows in torch, merged by log-sum-exp."""

    def __init__(self, kernel: VarlenKernel | None = None) -> None:
        self.kernel = kernel or flash_attn_kernel

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Attention output [N, num_heads, head_dim]; stores kept rows' K/V first."""
        write_kv(k, v, kv_cache, meta)
        out_new, lse_new = self._new_rows(q, k, v, meta, scale)
        with_prefix = [i for i in range(meta.num_seqs) if meta.context_lens[i] > 0]
        if not with_prefix:
            return out_new
        rows = torch.cat([torch.arange(meta.rows(i).start, meta.rows(i).stop) for i in with_prefix]).to(q.device)
        out_pre, lse_pre = self._prefix(q, kv_cache, meta, with_prefix, rows, scale)
        out = out_new.clone()
        out[rows] = merge_attention_states(out_pre, lse_pre, out_new[rows], lse_new[rows])
        return out

    @staticmethod
    def _new_rows(q, k, v, meta: AttentionMetadata, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sequence's new rows among themselves under their visibility mask."""
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32, device=q.device)
        for i in range(meta.num_seqs):
            r = meta.rows(i)
            out[r], lse[r] = masked_attention_with_lse(q[r], k[r], v[r], meta.visibility[i], scale)
        return out, lse

    def _prefix(self, q, kv_cache, meta: AttentionMetadata, seqs: list[int], rows: torch.Tensor, scale: float):
        """Every new row of the listed sequences against its whole cached prefix (no mask)."""
        slots = torch.cat([meta.prefix_slots[i] for i in seqs])
        keys, values = kv_cache[0].index_select(0, slots), kv_cache[1].index_select(0, slots)
        n_q = [meta.rows(i).stop - meta.rows(i).start for i in seqs]
        n_k = [meta.context_lens[i] for i in seqs]
        cu_q = torch.tensor([0] + list(accumulate(n_q)), dtype=torch.int32, device=q.device)
        cu_k = torch.tensor([0] + list(accumulate(n_k)), dtype=torch.int32, device=q.device)
        out, lse = self.kernel(q[rows], keys, values, cu_q, cu_k, max(n_q), max(n_k), scale)
        return out, lse.transpose(0, 1).float()  # lse [Nq, h]
