"""Greedy SPACE equals greedy plain decoding, token for token, whatever the candidates are."""

from __future__ import annotations

import random

import pytest
import torch

from tgi_space.config import SpacePolicy
from tgi_space.engine import Engine
from tgi_space.llm import LLM
from tgi_space.sampling import SamplingParams

PROMPTS = [[1] + list(range(5 + i, 5 + i + 3 + 5 * i)) for i in range(8)]  # lengths 4..39


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(str(llama_dir), kv_cache_bytes=2**24, block_size=4, space=SpacePolicy(k_max=3, planner=False))


def reference(llm, prompts, params):
    return [o.token_ids for o in llm.generate(prompts, params, speculate="none")]


def oracle_drafts(monkeypatch, truth: dict[int, list[int]], error_rate: float, seed: int):
    """Replace the model's drafts by the true continuation, corrupted at random positions."""
    rng = random.Random(seed)
    original = Engine._draft_next

    def drafted(self, seq, plan, groups, accepted):
        original(self, seq, plan, groups, accepted)
        if seq.is_finished or not seq.candidates:
            return
        ref = truth[tuple(seq.tokens[: seq.num_prompt])]
        start = len(seq.output_ids)
        cands = ref[start : start + len(seq.candidates)]
        cands += [5] * (len(seq.candidates) - len(cands))
        seq.candidates = [c if rng.random() > error_rate else (c + 1) % 90 + 4 for c in cands]

    monkeypatch.setattr(Engine, "_draft_next", drafted)


@pytest.mark.parametrize("batch", [1, 4, 8])
@pytest.mark.parametrize("error_rate", [0.0, 0.3, 1.0])
def test_space_equals_ar_with_any_candidates(llm, monkeypatch, batch, error_rate):
    prompts = PROMPTS[:batch]
    params = SamplingParams(max_new_tokens=24)
    ref = reference(llm, prompts, params)
    oracle_drafts(monkeypatch, {tuple(p): r for p, r in zip(prompts, ref)}, error_rate, seed=batch)
    outs = llm.generate(prompts, params, speculate="space")
    assert [o.token_ids for o in outs] == ref
    if error_rate == 0.0:  # every candidate right: k + 1 tokens per step after the first
        assert all(o.stats.num_steps <= 1 + -(-23 // 4) for o in outs)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_space_equals_ar_with_model_drafts(llm):
    params = SamplingParams(max_new_tokens=30)
    ref = reference(llm, PROMPTS, params)
    assert [o.token_ids for o in llm.generate(PROMPTS, params, speculate="space")] == ref


@pytest.mark.parametrize("error_rate", [0.0, 0.5])
def test_stops_inside_an_accepted_run_truncate_like_ar(llm, monkeypatch, error_rate):
    prompts = PROMPTS[:6]
    base = reference(llm, prompts, SamplingParams(max_new_tokens=20))
    oracle_drafts(monkeypatch, {tuple(p): r for p, r in zip(prompts, base)}, error_rate, seed=7)
    for stop_at in (1, 2, 5, 9):
        params = [SamplingParams(max_new_tokens=20, stop_token_ids=[r[stop_at]]) for r in base]
        ref = [o for o in llm.generate(prompts, params, speculate="none")]
        outs = llm.generate(prompts, params, speculate="space")
        assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
        assert [o.finish_reason for o in outs] == [o.finish_reason for o in ref]
        assert all(len(o.token_ids) <= stop_at + 1 for o in outs)
    for max_new in (1, 2, 3, 7):
        params = SamplingParams(max_new_tokens=max_new)
        outs = llm.generate(prompts, params, speculate="space")
        assert [o.token_ids for o in outs] == [r[:max_new] for r in base]
        assert all(o.finish_reason == "length" for o in outs)


def test_penalties_are_identical_in_both_modes(llm, monkeypatch):
    params = SamplingParams(max_new_tokens=24, repetition_penalty=1.3, frequency_penalty=0.5)
    ref = reference(llm, PROMPTS[:4], params)
    oracle_drafts(monkeypatch, {tuple(p): r for p, r in zip(PROMPTS[:4], ref)}, 0.2, seed=3)
    assert [o.token_ids for o in llm.generate(PROMPTS[:4], params, speculate="space")] == ref
    plain = reference(llm, PROMPTS[:4], SamplingParams(max_new_tokens=24))
    assert plain != ref  # the penalties did change something, so the check above has teeth


def test_logprobs_and_top_tokens_match_ar(llm, monkeypatch):
    params = SamplingParams(max_new_tokens=12, top_n_tokens=3)
    ar = llm.generate(PROMPTS[:3], params, speculate="none")
    oracle_drafts(monkeypatch, {tuple(p): o.token_ids for p, o in zip(PROMPTS[:3], ar)}, 0.3, seed=1)
    sp = llm.generate(PROMPTS[:3], params, speculate="space")
    for a, s in zip(ar, sp):
        la = torch.tensor([t.logprob for t in a.tokens])
        ls = torch.tensor([t.logprob for t in s.tokens])
        torch.testing.assert_close(ls, la, atol=1e-4, rtol=0)
        assert [[i for i, _ in t.top] for t in s.tokens] == [[i for i, _ in t.top] for t in a.tokens]
        assert all(t.top[0][0] == t.token_id for t in s.tokens)  # greedy: the best is emitted
    assert any(len(set(t.step for t in s.tokens)) < len(s.tokens) for s in sp)  # multi-token steps happened


def test_group_pruning_keeps_output(llama_dir, monkeypatch):
    llm = LLM(str(llama_dir), kv_cache_bytes=2**24, space=SpacePolicy(k_max=3, prune_groups=2, planner=False))
    params = SamplingParams(max_new_tokens=20)
    ref = reference(llm, PROMPTS[:4], params)
    oracle_drafts(monkeypatch, {tuple(p): r for p, r in zip(PROMPTS[:4], ref)}, 0.3, seed=9)
    assert [o.token_ids for o in llm.generate(PROMPTS[:4], params, speculate="space")] == ref
