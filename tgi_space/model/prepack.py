"""Weights packed once at start-up for the CPU GEMMs (the engine's largest cost per step), two ways:

- **oneDNN** (bf16 on CPUs with native bf16 GEMMs: AVX512-BW/VL/DQ, AVX-NE-CONVERT, AMX). `F.linear`
  on a bf16 CPU tensor reorders the weight into oneDNN's blocked layout on every call; for the decode
  regime (1-64 rows) that reorder costs as much as the multiplication. The packed call gives every
  row exactly the bits `F.linear` gives it alone (packed for one row: no K-blocked kernel at any row
  count) and halves the time of a 384 x 2048 projection at 1-32 rows.
- **panels** (everywhere else on CPU: float32, and bf16 on AVX2-only CPUs such as AMD Zen 3, where
  oneDNN refuses to pack bf16 and torch runs bf16 GEMMs in a reference loop, 5-17x slower than
  float32, and where MKL's and oneDNN's float32 GEMMs round a lone row differently from a row among
  others). `csrc/panel_gemm.cpp`: W as panels of 16 output columns, every output one float32 fused
  multiply-add chain over K in order, whatever the row count, the rows beside it or the thread.
  float32 weights that bf16 holds exactly (a bf16 checkpoint run in float32) are kept as bf16 panels
  and widened in the kernel: the same bits, half the bytes streamed per step (`narrowest_exact`).

Either way a row gets the same bits whatever else is in the step (tests/test_prepack.py,
docs/lossless.md), so greedy speculation stays plain decoding bit for bit.
Costs one extra copy of the projection weights (the originals stay for adapters and checks).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

PACK_ROWS = 1  # oneDNN's batch-size hint when packing: the decode regime (measured: also batch-invariant)
KERNEL_CACHE = 1024  # oneDNN's primitive cache holds this many kernels (its default capacity)
PANEL_SOURCE = Path(__file__).with_name("csrc") / "panel_gemm.cpp"
_warmed: set[tuple] = set()  # (weight shape, has bias, rows) whose oneDNN kernel this process has built


@dataclass(frozen=True)
class Panels:
    """A weight packed for csrc/panel_gemm.cpp: [ceil(out / 16), in, 16], zero-padded past `out_features`."""

    panels: torch.Tensor
    out_features: int


def packing(device: str, dtype: str) -> str | None:
    """How `dtype` weights are packed on `device`: "onednn", "panels" or None (not packed: CUDA, fp16, or
    no kernel)."""
    if torch.device(device).type != "cpu":
        return None
    if dtype == "bfloat16" and native_bf16_gemm():
        return "onednn"
    if dtype in ("float32", "bfloat16") and panel_kernel_error() is None:
        return "panels"
    return None


def can_prepack(device: str, dtype: str) -> bool:
    """Whether packed weights apply to `dtype` on `device` (`packing`)."""
    return packing(device, dtype) is not None


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


@functools.cache
def panel_kernel():
    """The compiled panel GEMM (built once per machine with g++ and ninja, then loaded from torch's cache)."""
    from torch.utils.cpp_extension import load

    from tgi_space.attention.fused import FLAGS, _ninja_on_path

    _ninja_on_path()
    return load(name="tgi_space_panel_gemm", sources=[str(PANEL_SOURCE)], extra_cflags=FLAGS,
                extra_ldflags=["-fopenmp"], verbose=False)


@functools.cache
def panel_kernel_error() -> str | None:
    """None when the panel GEMM builds and loads here, else why not (one line)."""
    try:
        panel_kernel()
    except Exception as err:  # a missing compiler or ninja, a failed build: weights stay unpacked
        return f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
    return None


def prepack_linears(model: nn.Module, kind: str = "onednn") -> dict[nn.Module, torch.Tensor | Panels]:
    """{nn.Linear: its packed weight} for every linear layer of `model`, packed as `kind` (`packing`)."""
    return {m: _pack(m.weight.detach(), kind) for m in model.modules() if isinstance(m, nn.Linear)}


def _pack(weight: torch.Tensor, kind: str) -> torch.Tensor | Panels:
    if kind == "panels":
        return Panels(panel_kernel().pack_panels(narrowest_exact(weight).contiguous()), weight.shape[0])
    return torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)


def narrowest_exact(weight: torch.Tensor) -> torch.Tensor:
    """`weight` as bf16 when it is float32 and bf16 holds every value exactly (a bf16 checkpoint run in
    float32): the kernels widen it back to the same float32 values, so the products and sums keep their
    bits, and a step streams half the bytes. Else `weight` itself."""
    if weight.dtype != torch.float32:
        return weight
    narrow = weight.to(torch.bfloat16)
    return narrow if torch.equal(narrow.float(), weight) else weight


def packed_linear(packed: torch.Tensor | Panels, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """x [N, in] @ W^T (+ bias) with W packed by `prepack_linears`."""
    if isinstance(packed, Panels):
        return panel_kernel().panel_linear(x, packed.panels, bias, packed.out_features)
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
    """One (module, oneDNN-packed weight) per distinct (out, in, has bias); panels need no warming."""
    out: dict[tuple, tuple[nn.Module, torch.Tensor]] = {}
    for module, weight in packed.items():
        if isinstance(weight, Panels):
            continue
        out.setdefault((*module.weight.shape, module.bias is not None), (module, weight))
    return out
