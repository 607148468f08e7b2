"""oneDNN-packed weights for the CPU GEMMs (the engine's largest fixed cost per step): bf16 where the CPU
has native bf16 GEMMs, float32 where it does not (AVX2 only), the `auto` dtype in each case.

`F.linear` on a bf16 CPU tensor reorders the weight into oneDNN's blocked layout on every call;
for the decode regime (1-64 rows) that reorder costs as much as the multiplication. Packing each
projection's weight once at start-up and calling oneDNN's linear on the packed copy halves the
time of a 384 x 2048 projection at 1-32 rows (measured with `tgi-space bench-engine`; README, "The
engine itself").

In bf16 the packed call gives every row exactly the bits `F.linear` gives it alone (packed for one
row: no K-blocked kernel at any row count); in float32 every row the bits it gets in a call of its
own (a lone row sent as two); tests/test_prepack.py, docs/lossless.md. Greedy speculation stays
plain decoding bit for bit.
Costs one extra copy of the projection weights (the originals stay for adapters and checks).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

PACK_ROWS = 1  # oneDNN's batch-size hint when packing: the decode regime (measured: also batch-invariant)
KERNEL_CACHE = 1024  # oneDNN's primitive cache holds this many kernels (its default capacity)
_warmed: set[tuple] = set()  # (weight shape, has bias, rows) whose kernel this process has built


def can_prepack(device: str, dtype: str) -> bool:
    """Whether packed weights apply: CPU, oneDNN built into this torch, and the dtype this CPU packs
    (`packed_dtype`)."""
    return torch.device(device).type == "cpu" and _has_onednn() and dtype == packed_dtype()


def packed_dtype() -> str:
    """The dtype whose weights are packed on this CPU: bfloat16 where oneDNN has native bf16 GEMMs (the
    CPU default there); else float32 (the default there), whose packed GEMM gives a row the same bits
    at any row count from 2 (measured on AVX2: a lone row goes to another kernel, so it is sent as 2)."""
    return "bfloat16" if native_bf16_gemm() else "float32"


def _has_onednn() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@functools.cache
def native_bf16_gemm() -> bool:
    """Whether this CPU's oneDNN has native bf16 GEMMs, asked by packing one small weight (oneDNN
    refuses on CPUs without them; torch then runs bf16 GEMMs in a slow reference loop)."""
    if not _has_onednn():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=torch.bfloat16), PACK_ROWS)
    except RuntimeError:
        return False
    return True


def prepack_linears(model: nn.Module) -> dict[nn.Module, torch.Tensor]:
    """{nn.Linear: its packed bf16 weight} for every linear layer of `model`."""
    return {
        m: torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), PACK_ROWS)
        for m in model.modules()
        if isinstance(m, nn.Linear)
    }


def packed_linear(packed: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """x [N, in] @ W^T (+ bias) with W packed by `prepack_linears`. A lone float32 row is sent twice:
    oneDNN's one-row float32 kernel sums in another order than its kernel for 2 rows and more."""
    if x.shape[0] == 1 and x.dtype == torch.float32:
        return torch.ops.mkldnn._linear_pointwise(x.expand(2, -1), packed, bias, "none", [], "")[:1]
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def warm_rows(packed: dict[nn.Module, torch.Tensor], decode_rows: int) -> int:
    """How many row counts to warm: every one a decode step can send, as far as oneDNN's kernel cache
    holds them for every weight shape (a larger range would evict what it built)."""
    return min(decode_rows, KERNEL_CACHE // max(1, len(_shapes(packed))))


def warm_packed(packed: dict[nn.Module, torch.Tensor], max_rows: int) -> None:
    """Build oneDNN's kernel for every row count 1..max_rows of each packed weight shape, once per process:
    the first call at a new row count costs ~0.5 ms per shape (measured here), which a step would pay
    whenever its row count is new, and which would teach the planner that rows cost several times what
    they do. The results do not depend on it (same bits)."""
    for key, (module, weight) in _shapes(packed).items():
        for rows in range(1, max_rows + 1):
            if (*key, rows) not in _warmed:
                packed_linear(weight, module.bias, torch.zeros(rows, key[1], dtype=module.weight.dtype))
                _warmed.add((*key, rows))


def _shapes(packed: dict[nn.Module, torch.Tensor]) -> dict[tuple, tuple[nn.Module, torch.Tensor]]:
    """One (module, packed weight) per distinct (out, in, has bias)."""
    out: dict[tuple, tuple[nn.Module, torch.Tensor]] = {}
    for module, weight in packed.items():
        out.setdefault((*module.weight.shape, module.bias is not None), (module, weight))
    return out
