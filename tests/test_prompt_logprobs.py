"""Prompt-token log-probabilities (TGI's decoder_input_details): every prompt token but the first, as TGI."""

from __future__ import annotations

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.inprocess_server import InProcessServer
from tgi_space.llm import LLM
from tgi_space.sampling import SamplingParams


def reference(model_dir, ids: list[int]) -> list[float]:
    """transformers' own fp32 log-probability of each prompt token given the ones before it."""
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
    return logp[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1).tolist()


@pytest.mark.parametrize("speculate", ["none", "space"])
def test_offline_prompt_logprobs_match_transformers(llama_dir, speculate):
    llm = LLM(str(llama_dir), dtype="float32", kv_cache_bytes=2**22)
    prompts = [[1, 5, 9, 13, 5, 9, 13, 5, 9], [1, 40, 41, 42]]
    outs = llm.generate(prompts, SamplingParams(max_new_tokens=4, prompt_logprobs=True), speculate=speculate)
    for ids, out in zip(prompts, outs):
        got = out.stats.prompt_logprobs
        assert got[0] is None and len(got) == len(ids)
        torch.testing.assert_close(torch.tensor(got[1:]), torch.tensor(reference(llama_dir, ids)), atol=1e-4, rtol=0)
    plain = llm.generate(prompts[:1], SamplingParams(max_new_tokens=4))[0]
    assert plain.stats.prompt_logprobs is None  # not computed unless asked for


def test_http_decoder_input_details_returns_prompt_logprobs(llama_dir):
    server = InProcessServer(llama_dir, dtype="float32").start()
    try:
        body = {"inputs": "w5 w6 w7 w5 w6", "parameters": {"max_new_tokens": 3, "decoder_input_details": True}}
        details = httpx.post(f"{server.url}/generate", json=body, timeout=60).json()["details"]
    finally:
        server.stop()
    prefill = details["prefill"]
    ids = [t["id"] for t in prefill]
    assert prefill[0]["logprob"] is None and all(t["logprob"] is not None for t in prefill[1:])
    expected = reference(llama_dir, ids)
    torch.testing.assert_close(torch.tensor([t["logprob"] for t in prefill[1:]]), torch.tensor(expected),
                               atol=1e-4, rtol=0)
