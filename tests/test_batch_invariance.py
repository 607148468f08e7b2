"""bf16 on CPU: a row gets the same bits whatever else is in the step, so greedy SPACE == plain decoding exactly.

The reference is plain decoding of the same engine (one row per step, one sequence);
the negative control is the old per-sequence SDPA path, which these checks catch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.checkpoints import save_checkpoint
from tests.test_space_greedy import oracle_drafts
from tgi_space.attention.fused import FusedBackend
from tgi_space.attention.matmul import MatmulBackend
from tgi_space.attention.metadata import AttentionMetadata
from tgi_space.attention.sdpa import SdpaBackend
from tgi_space.bench import humaneval_prompts
from tgi_space.config import SpacePolicy
from tgi_space.llm import LLM
from tgi_space.sampling import SamplingParams
from tgi_space.invariance import gemm_mismatches, step_mismatches

MODEL = Path(__file__).resolve().parents[1] / "models" / "tiny-space-py"
FAMILIES = ["llama", "llama3", "mistral", "qwen2"]


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return humaneval_prompts(24)


@pytest.mark.parametrize("dtype, backend, invariant", [
    ("bfloat16", "fused", True), ("bfloat16", "matmul", True), ("bfloat16", "sdpa", False),
    # float32 (the default on CPUs without native bf16 GEMMs): the panel GEMM and the fused kernel keep every
    # bit; the matmul fallback's batched float32 matmuls (MKL) do not, nor does SDPA (negative control)
    ("float32", "fused", True), ("float32", "sdpa", False),
])
def test_rows_get_the_same_bits_whatever_the_batch(prompts, dtype, backend, invariant):
    llm = LLM(str(MODEL), dtype=dtype, attention_backend=backend, space=SpacePolicy(k_max=2))
    ids = [llm.tokenizer.encode(p) for p in prompts]
    mismatches = step_mismatches(llm, ids)
    if invariant:
        assert mismatches == 0
        assert not any(gemm_mismatches(llm).values())
    else:  # negative control: the per-sequence SDPA path rounds rows differently inside a batch
        assert mismatches > 0


@pytest.mark.parametrize("backend", [MatmulBackend, FusedBackend])
def test_cpu_backends_equal_sdpa_in_float32(backend):
    """Same attention as the SDPA reference on a ragged step with prefixes, prefill and masks (fp32)."""
    from tests.test_attention import D, random_step

    q, k, v, cache, meta = random_step(7)
    meta = AttentionMetadata(**{**meta.__dict__, "num_kv_heads": k.shape[1]})
    ref = SdpaBackend().forward(q, k, v, cache.clone(), meta, D**-0.5)
    ours_cache = cache.clone()
    ours = backend().forward(q, k, v, ours_cache, meta, D**-0.5)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    ref_cache = cache.clone()
    SdpaBackend().forward(q, k, v, ref_cache, meta, D**-0.5)
    assert torch.equal(ours_cache, ref_cache)  # the same K/V were kept, in the same slots


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_greedy_space_equals_plain_on_random_checkpoints(tmp_path, monkeypatch, family):
    """Random weights in bf16 are full of near-ties: any rounding difference would flip an argmax.

    Drafts are the true continuation corrupted at random (random masks would draft nothing
    acceptable), so steps really verify and accept several tokens in ragged batches.
    """
    save_checkpoint(tmp_path, family, seed=11)
    llm = LLM(str(tmp_path), dtype="bfloat16", kv_cache_bytes=2**24, block_size=4, space=SpacePolicy(k_max=3, latency_curve={1: 1.0, 512: 1.0}))  # pinned: not governed by timings
    gen = torch.Generator().manual_seed(5)
    lengths = torch.randint(3, 40, (8,), generator=gen).tolist()
    prompts = [torch.randint(4, 90, (n,), generator=gen).tolist() for n in lengths]
    params = [SamplingParams(max_new_tokens=12 + 3 * i) for i in range(8)]
    reference = [o.token_ids for o in llm.generate(prompts, params, speculate="none")]
    oracle_drafts(monkeypatch, {tuple(p): r for p, r in zip(prompts, reference)}, error_rate=0.3, seed=3)
    for batch in (1, 4, 8):
        got, steps = [], 0
        for start in range(0, len(prompts), batch):
            outs = llm.generate(prompts[start : start + batch], params[start : start + batch])
            got += [o.token_ids for o in outs]
            steps += sum(o.stats.num_steps for o in outs)
        assert got == reference
        assert steps < sum(len(r) for r in reference)  # multi-token steps happened
