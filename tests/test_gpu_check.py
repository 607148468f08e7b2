"""`make gpu-check` on a GPU machine: SPACE equals plain decoding on the card, and a short speed table.

Marked `cuda`: skipped where torch sees no GPU (the Makefile target says so before pytest starts).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch

from tgi_space.config import SpacePolicy
from tgi_space.llm import LLM
from tgi_space.sampling import SamplingParams

MODEL = Path(__file__).resolve().parents[1] / "models" / "tiny-space-py"
PROMPTS = ["def fibonacci(n):\n", "import os\n\n\ndef list_files(path):\n", "class Stack:\n    def __init__(self):\n",
           "def is_prime(n: int) -> bool:\n"]
BACKENDS = ["sdpa"] + (["flash"] if importlib.util.find_spec("flash_attn") is not None else [])

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device"),
    pytest.mark.skipif(not (MODEL / "model.safetensors").exists(), reason="the bundled model is not here"),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_space_equals_plain_decoding_on_cuda(backend):
    llm = LLM(str(MODEL), device="cuda", dtype="float32", attention_backend=backend, space=SpacePolicy(k_max=4))
    params = SamplingParams(max_new_tokens=64, ignore_eos=True)
    ar = llm.generate(PROMPTS, params, speculate="none")
    space = llm.generate(PROMPTS, params, speculate="space")
    assert [o.token_ids for o in space] == [o.token_ids for o in ar]
    assert all(o.stats.mean_tokens_per_step > 1.0 for o in space)


@pytest.mark.parametrize("backend", BACKENDS)
def test_speed_table_on_cuda(backend):
    """Batch 1, 128 tokens per prompt: tokens/s and tokens/step of plain decoding and SPACE (printed; run with -s)."""
    llm = LLM(str(MODEL), device="cuda", dtype="bfloat16", attention_backend=backend, space=SpacePolicy(k_max=4))
    params = SamplingParams(max_new_tokens=128, ignore_eos=True)
    llm.generate(PROMPTS[:1], SamplingParams(max_new_tokens=8), speculate="space")  # warm-up
    rows = []
    for mode in ("none", "space"):
        tokens = steps = 0
        torch.cuda.synchronize()
        start = time.perf_counter()
        for prompt in PROMPTS:
            (out,) = llm.generate([prompt], params, speculate=mode)
            tokens, steps = tokens + len(out.token_ids), steps + out.stats.num_steps
        torch.cuda.synchronize()
        rows.append((mode, tokens / (time.perf_counter() - start), tokens / steps))
    name = torch.cuda.get_device_name()
    print(f"\n{name}, {backend}, bf16, batch 1, 128 new tokens x {len(PROMPTS)} prompts")
    print("| mode | tokens/s | tokens/step |\n|---|---|---|")
    for mode, tps, per_step in rows:
        print(f"| {mode} | {tps:.1f} | {per_step:.2f} |")
    print(f"SPACE / plain: {rows[1][1] / rows[0][1]:.2f}x")
    assert rows[0][2] == 1.0 and rows[1][2] > 1.0
