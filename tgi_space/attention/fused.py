"""Fused attention for CPU: one C++ call per layer for the whole ragged batch, batch-invariant.

The kernel (csrc/fused_attention.cpp) computes each (query row, head) with one fixed computation
over that row's visible keys: the cached prefix in position order, then the visible new rows of its
own sequence (keys transposed 64 at a time so a vector holds 16 keys; in bf16 on CPUs with AMX,
AMX tile products, 16 queries by 16 keys at a time). Nothing else in the step enters it, so a row gets the same bits whatever else
is in the batch, in bf16, fp16 and fp32 alike; and no key is gathered, padded or masked in Python.
The same module holds the step's other row-wise kernels: RMSNorm with the residual add, rotary,
SwiGLU, the K/V store and a gated adapter's mask-row deltas (docs/lossless.md).

Built with torch's JIT extension loader (g++ and ninja) the first time it is used on a machine and
cached in torch's extension folder afterwards (TORCH_EXTENSIONS_DIR). `available()` says whether it
builds here; the `auto` backend falls back to `matmul` when it does not.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import torch

from tgi_space.attention.metadata import AttentionMetadata

SOURCE = Path(__file__).with_name("csrc") / "fused_attention.cpp"
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]  # -ffp-contract=off: no fused multiply-add


@functools.lru_cache(maxsize=1)
def kernel():
    """The compiled extension module (built once per machine, then loaded from torch's cache)."""
    from torch.utils.cpp_extension import load

    _ninja_on_path()
    return load(name="tgi_space_fused_attention", sources=[str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                verbose=False)


def _ninja_on_path() -> None:
    """torch's loader runs `ninja` from PATH; the PyPI wheel's binary sits beside this interpreter."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"


@functools.lru_cache(maxsize=1)
def available() -> str | None:
    """None when the kernel builds and loads here, else why not (one line)."""
    try:
        kernel()
    except Exception as err:  # a missing compiler or ninja, a failed build: the caller falls back
        return f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
    return None


class FusedBackend:
    """Attention for every sequence of the step in one kernel call per layer (CPU tensors)."""

    def __init__(self) -> None:
        reason = available()
        if reason is not None:
            raise RuntimeError(f"attention_backend 'fused': the CPU kernel does not build here ({reason}); "
                               "use 'matmul' or install g++ and ninja")
        self.kernels = kernel()  # also RMSNorm and rotary: the model's ForwardContext uses them

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Attention output [N, num_heads, head_dim]; stores kept rows' K/V first."""
        if meta.write_rows.numel():
            self.kernels.store_kv(k, v, kv_cache, meta.write_rows, meta.write_slots)
        f = meta.fused
        return self.kernels.fused_attention(q, k, v, kv_cache, f.cu_q, f.cu_ctx, f.prefix, f.visibility, f.cu_visibility,
                                        f.items, scale)
