"""On both bundled models (base + gated adapter; SAR-SFT): greedy SPACE and SDSAT == greedy AR on HumanEval, batched."""

from __future__ import annotations

from pathlib import Path

import pytest

from tgi_space.bench import humaneval_prompts
from tgi_space.config import SpacePolicy
from tgi_space.llm import LLM
from tgi_space.model.prepack import native_bf16_gemm
from tgi_space.sampling import SamplingParams

MODELS = Path(__file__).resolve().parents[1] / "models"
NUM_PROMPTS = 30


# float32 and bf16 where this CPU has native bf16 GEMMs (bf16 is its default there); float32 alone elsewhere
# (the default there, bit for bit; bf16 runs in torch's reference loop, too slow for 30 prompts x 12 runs:
# its bits are checked on random checkpoints in test_batch_invariance.py and test_sdsat.py)
DTYPES = ("float32", "bfloat16") if native_bf16_gemm() else ("float32",)


@pytest.fixture(scope="module", params=[(m, d) for m in ("tiny-space-py", "tiny-space-py-sar") for d in DTYPES],
                ids=lambda p: f"{p[0]}-{p[1]}")
def llm(request):
    """fp32 (bit for bit with packed GEMMs, else exact up to float non-associativity) and bf16 (bit for bit)."""
    model, dtype = request.param
    assert (MODELS / model / "config.json").is_file(), "the bundled models are in the repository (make tiny-model)"
    flat = {1: 0.01, 4096: 0.01}  # a pinned, flat t(N): the planner sends trees and groups whatever the machine's load
    return LLM(str(MODELS / model), dtype=dtype, max_num_seqs=8, space=SpacePolicy(k_max=4, latency_curve=flat))


def mixed_params(i: int) -> SamplingParams:
    """Different stop conditions per prompt: length only, stop strings, stop ids."""
    kinds = [
        SamplingParams(max_new_tokens=40 + i % 9),
        SamplingParams(max_new_tokens=48, stop=["\n\n"]),
        SamplingParams(max_new_tokens=48, stop=["return", ":"]),
        SamplingParams(max_new_tokens=40, ignore_eos=True),
    ]
    return kinds[i % len(kinds)]


@pytest.fixture(scope="module")
def prompts():
    return humaneval_prompts(NUM_PROMPTS)


@pytest.fixture(scope="module")
def reference(llm, prompts):
    params = [mixed_params(i) for i in range(len(prompts))]
    return [(o.token_ids, o.finish_reason) for o in llm.generate(prompts, params, speculate="none")]


MIN_TOKENS_PER_STEP = {"space": 1.3, "sdsat": 1.1}  # SDSAT: a + 2 tokens for two passes


@pytest.mark.parametrize("mode", ["space", "sdsat"])
@pytest.mark.parametrize("batch", [1, 4, 8])
def test_speculation_equals_ar_on_humaneval(llm, prompts, reference, batch, mode):
    got, steps, tokens = [], 0, 0
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        params = [mixed_params(start + j) for j in range(len(chunk))]
        outs = llm.generate(chunk, params, speculate=mode)
        got += [(o.token_ids, o.finish_reason) for o in outs]
        steps += sum(o.stats.num_steps for o in outs)
        tokens += sum(len(o.token_ids) for o in outs)
    assert got == reference
    assert {r for _, r in reference} >= {"length", "stop_sequence"}  # the stop conditions were exercised
    assert tokens / steps > MIN_TOKENS_PER_STEP[mode]  # the masks really draft: multi-token steps happen here
