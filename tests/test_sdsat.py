"""SDSAT in the engine: greedy == plain decoding token for token, sampling == plain sampling, KV and blocks."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from tests.checkpoints import save_checkpoint
from tests.test_space_greedy import PROMPTS
from tests.test_space_sampling import two_sample_pvalue
from tgi_space import tree as tree_module
from tgi_space.config import SpacePolicy
from tgi_space.engine import SpaceUnavailable
from tgi_space.llm import LLM
from tgi_space.sampling import SamplingParams
from tgi_space.sdsat import Sdsat
from tgi_space.tree import ROOT, DraftTree

FAMILIES = ["llama", "llama3", "mistral", "qwen2"]


FORCED = {1: 0.01, 512: 0.01}  # a pinned latency curve: the governor does not time steps, SDSAT passes every step


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(str(llama_dir), kv_cache_bytes=2**24, block_size=4, space=SpacePolicy(k_max=3, latency_curve=FORCED))


def reference(llm, prompts, params):
    return [o.token_ids for o in llm.generate(prompts, params, speculate="none")]


def oracle_drafts(monkeypatch, truth: dict[tuple[int, ...], list[int]], error_rate: float, seed: int) -> None:
    """After each draft pass: the true continuation after v as the chain (as long as the model's), corrupted
    at random, with random wrong siblings, so verify passes accept some, all or none of it."""
    rng = random.Random(seed)
    original = Sdsat.draft_next

    def draft_next(self, seq, plan, groups, stats):
        original(self, seq, plan, groups, stats)
        if not seq.draft_tree:
            return
        ref = truth[tuple(seq.tokens[: seq.num_prompt])]
        start = len(seq.output_ids)
        tree, parent = DraftTree(), ROOT
        for token in (ref[start : start + seq.draft_tree.max_depth] + [5] * 16)[: seq.draft_tree.max_depth]:
            token = token if rng.random() > error_rate else (token + 1) % 90 + 4
            rng.random() < 0.3 and tree.add(rng.randrange(4, 94), parent, 0.4, "sdsat", 0.4)
            parent = tree.add(token, parent, 0.9, "sdsat", 0.9)
        seq.draft_tree = tree

    monkeypatch.setattr(Sdsat, "draft_next", draft_next)


def all_blocks_back(llm) -> bool:
    bm = llm.engine.block_manager
    return bm.num_free_blocks == bm.num_blocks and not llm.engine.has_unfinished()


# ---- greedy: token for token ---------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 4, 8])
@pytest.mark.parametrize("error_rate", [0.0, 0.3, 1.0])
def test_sdsat_equals_plain_with_any_drafts(llm, monkeypatch, batch, error_rate):
    prompts = PROMPTS[:batch]
    params = [SamplingParams(max_new_tokens=10 + 3 * i, stop_token_ids=[7] if i % 3 == 2 else []) for i in range(batch)]
    ref = reference(llm, prompts, params)
    oracle_drafts(monkeypatch, {tuple(p): r for p, r in zip(prompts, ref)}, error_rate, seed=batch)
    outs = llm.generate(prompts, params, speculate="sdsat")
    assert [o.token_ids for o in outs] == ref
    if error_rate == 0.0:  # every draft right: k + 2 tokens per two passes
        assert sum(o.stats.num_steps for o in outs) < sum(len(r) for r in ref)
        assert any(max(o.stats.tokens_per_step) == 1 + llm.engine.k_max for o in outs)
    assert all_blocks_back(llm)


def test_sdsat_equals_plain_with_model_drafts(llm):
    params = SamplingParams(max_new_tokens=30)
    assert [o.token_ids for o in llm.generate(PROMPTS, params, speculate="sdsat")] == reference(llm, PROMPTS, params)


def oracle_suffix(truth: dict[tuple[int, ...], list[int]], error_rate: float, seed: int, depth: int = 8):
    """A stand-in for the suffix drafter: after v, the true continuation `depth` deep (deeper than k),
    corrupted at random, with a wrong sibling now and then; scores fall along the path."""
    rng = random.Random(seed)

    def suffix_drafts(seq):
        ref = truth[tuple(seq.tokens[: seq.num_prompt])]
        tree, parent, score = DraftTree(), ROOT, 1.0
        for token in ref[len(seq.output_ids) : len(seq.output_ids) + depth]:
            token = token if rng.random() > error_rate else (token + 1) % 90 + 4
            score *= 0.9
            rng.random() < 0.3 and tree.add(rng.randrange(4, 94), parent, score / 2, "suffix", 0.5)
            parent = tree.add(token, parent, score, "suffix", 0.9)
        return tree

    return suffix_drafts


@pytest.mark.parametrize("batch", [1, 4, 8])
@pytest.mark.parametrize("error_rate", [0.0, 0.3])
def test_greedy_verify_passes_with_suffix_drafts_equal_plain(llama_dir, monkeypatch, batch, error_rate):
    """With the planned step and the suffix drafter (the defaults), a greedy verify pass carries suffix drafts
    after v beside the adaptive chain, as deep as max_tree_depth: outputs stay plain decoding's, paths longer
    than the k adaptive tokens are accepted (the scheduler's reserve covers them), blocks come back."""
    llm = LLM(str(llama_dir), kv_cache_bytes=2**24, block_size=4, space=SpacePolicy(k_max=3, latency_curve=FORCED))
    sdsat = llm.engine.sdsat
    assert sdsat.max_path == SpacePolicy().max_tree_depth > sdsat.max_depth == 3
    prompts = PROMPTS[:batch]
    params = [SamplingParams(max_new_tokens=24 + 3 * i, stop_token_ids=[7] if i % 3 == 2 else []) for i in range(batch)]
    ref = reference(llm, prompts, params)
    monkeypatch.setattr(sdsat, "suffix", oracle_suffix({tuple(p): r for p, r in zip(prompts, ref)}, error_rate, batch))
    sent, verify_plan = [], sdsat._verify_plan

    def recording(seq, *args):
        plan = verify_plan(seq, *args)
        sent.append(set(plan.tree.sources))
        return plan

    monkeypatch.setattr(sdsat, "_verify_plan", recording)
    outs = llm.generate(prompts, params, speculate="sdsat")
    assert [o.token_ids for o in outs] == ref
    assert any(s == {"sdsat", "suffix"} for s in sent)  # both drafters in one verify pass
    if error_rate == 0.0:
        assert any(max(o.stats.tokens_per_step) > 1 + llm.engine.k_max for o in outs)
    assert all_blocks_back(llm)


def test_adaptive_tokens_only_without_the_suffix_drafter_or_the_planner(llama_dir):
    """drafters without "suffix", or the fixed layout (the paper's SDSAT), keep verify passes to the adaptive
    chain, and the reserve to k."""
    for policy in (SpacePolicy(k_max=3, drafters=("masks",)), SpacePolicy(k_max=3, planner=False)):
        sdsat = LLM(str(llama_dir), kv_cache_bytes=2**22, block_size=4, space=policy).engine.sdsat
        assert sdsat.suffix is None and sdsat.max_path == sdsat.max_depth == 3


def test_the_planner_keeps_the_suffix_drafts_worth_their_rows():
    """`Speculator.sdsat_trees` chooses a verify pass's nodes as the planner chooses SPACE's: where rows are
    free every node goes; where each row costs half a plain step, tokens per second (value / t, t in plain
    steps) are 1 / 1 plain, (1 + 0.9) / 1.5 = 1.27 with the likeliest node, (1 + 0.9 + 0.3) / 2 = 1.1 with
    two: only the first goes."""
    from types import SimpleNamespace

    from tgi_space.space import SeqPlan
    from tgi_space.speculation import Speculator

    def planned():
        tree = DraftTree()
        first = tree.add(11, ROOT, 0.9, "sdsat", 0.9)
        tree.add(12, first, 0.3, "suffix", 0.5)
        tree.add(13, ROOT, 0.2, "suffix", 0.5)
        seq = SimpleNamespace(sdsat=True, params=SamplingParams(), draft_tree=tree)
        return [(seq, SeqPlan(chain=[5], num_candidates=0, anchors=[], group_size=0, num_cached=10))]

    flat = Speculator(SpacePolicy(latency_curve={1: 0.01, 64: 0.01}), 4, lambda *a: 1e-3, 8, 64)
    steep = Speculator(SpacePolicy(latency_curve={1: 0.01, 65: 0.33}), 4, lambda *a: 1e-3, 8, 64)
    for spec, kept in ((flat, [11, 12, 13]), (steep, [11])):
        batch = planned()
        spec.sdsat_trees(batch, None)
        assert sorted(batch[0][0].draft_tree.tokens) == kept
    pure = planned()
    pure[0][0].draft_tree = pure[0][0].draft_tree.subtree([0])  # the adaptive chain alone: sized by sdsat_depth
    steep.sdsat_trees(pure, None)
    assert pure[0][0].draft_tree.tokens == [11]


def test_sdsat_steps_teach_the_cost_factors(llama_dir, monkeypatch):
    """SDSAT's steps (draft passes with adaptive rows, verify passes with trees) are timed against the probed
    curve like SPACE's, so the depth and the trees are priced by measured factors, not the priors."""
    llm = LLM(str(llama_dir), kv_cache_bytes=2**24, block_size=4, space=SpacePolicy(k_max=3))
    seen = []
    observe = llm.engine.speculator.observe_step
    monkeypatch.setattr(llm.engine.speculator, "observe_step",
                        lambda base, rows, *a, **kw: seen.append(rows > base) or observe(base, rows, *a, **kw))
    llm.generate(PROMPTS[:2], SamplingParams(max_new_tokens=24), speculate="sdsat")
    assert True in seen


@pytest.mark.parametrize("error_rate", [0.0, 0.5])
def test_stops_and_max_new_tokens_inside_an_accepted_run(llm, monkeypatch, error_rate):
    prompts = PROMPTS[:6]
    base = reference(llm, prompts, SamplingParams(max_new_tokens=20))
    oracle_drafts(monkeypatch, {tuple(p): r for p, r in zip(prompts, base)}, error_rate, seed=7)
    for stop_at in (1, 2, 5, 9):
        params = [SamplingParams(max_new_tokens=20, stop_token_ids=[r[stop_at]]) for r in base]
        ref = llm.generate(prompts, params, speculate="none")
        outs = llm.generate(prompts, params, speculate="sdsat")
        assert [(o.token_ids, o.finish_reason) for o in outs] == [(o.token_ids, o.finish_reason) for o in ref]
    for max_new in (1, 2, 3, 7):
        outs = llm.generate(prompts, SamplingParams(max_new_tokens=max_new), speculate="sdsat")
        assert [o.token_ids for o in outs] == [r[:max_new] for r in base]
        assert all(o.finish_reason == "length" for o in outs)
    assert all_blocks_back(llm)


def test_penalties_are_identical(llm, monkeypatch):
    params = SamplingParams(max_new_tokens=24, repetition_penalty=1.3, frequency_penalty=0.5)
    ref = reference(llm, PROMPTS[:4], params)
    oracle_drafts(monkeypatch, {tuple(p): r for p, r in zip(PROMPTS[:4], ref)}, 0.2, seed=3)
    assert [o.token_ids for o in llm.generate(PROMPTS[:4], params, speculate="sdsat")] == ref
    assert ref != reference(llm, PROMPTS[:4], SamplingParams(max_new_tokens=24))  # the penalties mattered


def test_logprobs_and_top_tokens_match_plain(llm, monkeypatch):
    params = SamplingParams(max_new_tokens=12, top_n_tokens=3)
    ar = llm.generate(PROMPTS[:3], params, speculate="none")
    oracle_drafts(monkeypatch, {tuple(p): o.token_ids for p, o in zip(PROMPTS[:3], ar)}, 0.3, seed=1)
    sd = llm.generate(PROMPTS[:3], params, speculate="sdsat")
    for a, s in zip(ar, sd):
        torch.testing.assert_close(torch.tensor([t.logprob for t in s.tokens]), torch.tensor([t.logprob for t in a.tokens]),
                                   atol=1e-4, rtol=0)
        assert [[i for i, _ in t.top] for t in s.tokens] == [[i for i, _ in t.top] for t in a.tokens]
    assert any(len(set(t.step for t in s.tokens)) < len(s.tokens) for s in sd)  # multi-token passes happened


def test_a_batch_mixes_space_sdsat_and_plain_sequences(llama_dir, monkeypatch):
    """One forward carries SPACE trees with groups, SDSAT draft/verify passes and plain rows."""
    flat = {1: 0.01, 512: 0.01}  # every row free: SPACE sends its trees and groups
    llm = LLM(str(llama_dir), kv_cache_bytes=2**24, block_size=4, space=SpacePolicy(k_max=3, latency_curve=flat))
    engine = llm.engine
    params = SamplingParams(max_new_tokens=20)
    ref = reference(llm, PROMPTS[:6], params)
    oracle_drafts(monkeypatch, {tuple(p): r for p, r in zip(PROMPTS[:6], ref)}, 0.3, seed=5)
    modes = ["space", "sdsat", "none"] * 2
    kinds_per_step = []
    execute = engine.execute

    def recording(planned, slots, keep_hidden=False):
        kinds_per_step.append({("sdsat" if s.sdsat else "space" if p.anchors or p.num_candidates else "plain")
                               for s, p in planned})
        return execute(planned, slots, keep_hidden)

    monkeypatch.setattr(engine, "execute", recording)
    seqs = [engine.add_request(p, params, m) for p, m in zip(PROMPTS[:6], modes)]
    while engine.has_unfinished():
        engine.step()
    assert [list(s.output_ids) for s in seqs] == ref
    assert any(k == {"space", "sdsat", "plain"} for k in kinds_per_step)
    assert all_blocks_back(llm)


# ---- bf16: bit for bit on random checkpoints of every family -------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_greedy_sdsat_equals_plain_on_random_checkpoints(tmp_path, monkeypatch, family):
    save_checkpoint(tmp_path, family, seed=11)
    llm = LLM(str(tmp_path), dtype="bfloat16", kv_cache_bytes=2**24, block_size=4, space=SpacePolicy(k_max=3))
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(4, 90, (n,), generator=gen).tolist() for n in torch.randint(3, 40, (8,), generator=gen).tolist()]
    params = [SamplingParams(max_new_tokens=12 + 3 * i) for i in range(8)]
    ref = reference(llm, prompts, params)
    oracle_drafts(monkeypatch, {tuple(p): r for p, r in zip(prompts, ref)}, error_rate=0.3, seed=3)
    for batch in (1, 4, 8):
        got, steps = [], 0
        for start in range(0, len(prompts), batch):
            outs = llm.generate(prompts[start : start + batch], params[start : start + batch], speculate="sdsat")
            got += [o.token_ids for o in outs]
            steps += sum(o.stats.num_steps for o in outs)
        assert got == ref
        assert steps < 2 * sum(len(r) for r in ref)


def cached_kv(engine, seq) -> torch.Tensor:
    """K/V of the sequence's cached positions, every layer: [layers, 2, num_cached, ...]."""
    slots = engine.block_manager.slots(seq.seq_id, 0, seq.num_cached)
    return torch.stack([cache.index_select(1, slots) for cache in engine.kv_caches])


def test_no_kv_of_a_rejected_node_survives(llama_dir, monkeypatch):
    """After every step, each sequence's cached K/V are bit for bit those plain decoding wrote (bf16)."""
    llm = LLM(str(llama_dir), dtype="bfloat16", kv_cache_bytes=2**24, block_size=4, space=SpacePolicy(k_max=3))
    engine = llm.engine
    prompts, params = PROMPTS[:4], SamplingParams(max_new_tokens=24, ignore_eos=True)
    plain_kv = {}
    seqs = [engine.add_request(p, params, "none") for p in prompts]
    while engine.has_unfinished():
        engine.step()
        for i, s in enumerate(seqs):
            if not s.is_finished:
                plain_kv[i] = cached_kv(engine, s).clone()
    ref = [list(s.output_ids) for s in seqs]
    oracle_drafts(monkeypatch, {tuple(p): r for p, r in zip(prompts, ref)}, 0.4, seed=2)
    seqs = [engine.add_request(p, params, "sdsat") for p in prompts]
    checked = 0
    while engine.has_unfinished():
        engine.step()
        for i, s in enumerate(seqs):
            if not s.is_finished:
                n = s.num_cached
                assert torch.equal(cached_kv(engine, s), plain_kv[i][:, :, :n]), i
                checked += 1
    assert [list(s.output_ids) for s in seqs] == ref and checked > 8


# ---- sampling: the output distribution is plain sampling's ---------------------------------------------


def plain_vs_sdsat_samples(llm, params: SamplingParams, n: int):
    """The first three tokens of n seeded requests per mode (different seeds: independent samples)."""
    outs = {}
    for mode, seed0 in (("none", 0), ("sdsat", 10**6)):
        ps = [SamplingParams(**{**params.__dict__, "seed": seed0 + i}) for i in range(n)]
        outs[mode] = [tuple(o.token_ids[:3]) for o in llm.generate([[1, 7, 9, 11]] * n, ps, speculate=mode)]
    return outs["none"], outs["sdsat"]


@pytest.fixture(scope="module")
def sampling_llm(llama_dir):
    return LLM(str(llama_dir), kv_cache_bytes=2**26, max_num_seqs=2048,
               space=SpacePolicy(k_max=3, max_step_query_tokens=10**6, speculate_mode="sdsat",
                                 sdsat_tree_sizes=(3, 4, 3), latency_curve=FORCED))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=4, do_sample=True, temperature=0.7, top_k=4),
        SamplingParams(max_new_tokens=4, do_sample=True, top_p=0.6, repetition_penalty=1.5),
        SamplingParams(max_new_tokens=4, do_sample=True, temperature=1.0),
    ],
    ids=["top_k", "top_p+penalty", "T=1"],
)
def test_sdsat_sampling_matches_plain_on_the_model(sampling_llm, monkeypatch, params):
    calls = {"rejection": 0, "accepted": 0}
    original = tree_module.verify_tree_rejection

    def counting(*args):
        path, bonus = original(*args)
        calls["rejection"] += 1
        calls["accepted"] += len(path)
        return path, bonus

    monkeypatch.setattr("tgi_space.speculation.verify_tree_rejection", counting)
    plain, sdsat = plain_vs_sdsat_samples(sampling_llm, params, 1500)
    assert len(set(plain)) > 3
    assert two_sample_pvalue(plain, sdsat) > 1e-3
    assert calls["rejection"] > 500 and calls["accepted"] > 100  # sampled trees were verified, and accepted


def test_seeded_sdsat_requests_are_reproducible(sampling_llm):
    params = SamplingParams(max_new_tokens=12, do_sample=True, temperature=1.3, seed=42)
    a = sampling_llm.generate([[1, 5, 6]] * 3, params, speculate="sdsat")
    b = sampling_llm.generate([[1, 5, 6]], params, speculate="sdsat")
    assert a[0].token_ids == a[1].token_ids == a[2].token_ids == b[0].token_ids


# ---- cancellations, blocks ------------------------------------------------------------------------------


def test_blocks_come_back_after_cancellations_in_mixed_batches(llama_dir):
    llm = LLM(str(llama_dir), kv_cache_bytes=2**22, block_size=4, space=SpacePolicy(k_max=3))
    engine, bm = llm.engine, llm.engine.block_manager
    start = bm.num_free_blocks
    rng = random.Random(1)
    seqs = []
    for _ in range(40):
        if rng.random() < 0.6:
            prompt = [1] + [rng.randrange(4, 90) for _ in range(rng.randrange(1, 30))]
            params = SamplingParams(max_new_tokens=rng.randrange(1, 20), do_sample=rng.random() < 0.5, seed=rng.randrange(99))
            seqs.append(engine.add_request(prompt, params, rng.choice(["sdsat", "sdsat", "space", "none"])))
        if seqs and rng.random() < 0.3:
            engine.abort(seqs.pop(rng.randrange(len(seqs))))
        engine.step()
        live = {s.seq_id for s in seqs if not s.is_finished}
        assert set(bm.block_tables) <= live
        assert set(engine._scratch_offsets) <= live | {s.seq_id for s in seqs}  # scratch: this step's sequences only
    for s in seqs:
        engine.abort(s)
    while engine.has_unfinished():
        engine.step()
    assert bm.num_free_blocks == start and not engine.scheduler.running and not engine.scheduler.waiting


# ---- which checkpoints SDSAT may decode ------------------------------------------------------------------


def edited(llama_dir, tmp_path, **changes) -> Path:
    folder = tmp_path / "ck"
    shutil.copytree(llama_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        cfg.pop(key) if value is None else cfg.__setitem__(key, value)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize(
    "changes, policy, message",
    [
        (dict(space_mask_token_id=None), {}, "space_mask_token_id"),
        (dict(sdsat_adaptive_token_ids=[90, 91, 92]), {}, "sdsat_adaptive_token_ids"),
        (dict(space_method="medusa"), {}, "space_method"),
        ({}, dict(k_max=5), "space_k 3"),
    ],
    ids=["no-mask", "per-offset-ids", "unknown-method", "k-beyond-trained"],
)
def test_sdsat_refuses_checkpoints_it_cannot_decode(llama_dir, tmp_path, changes, policy, message):
    llm = LLM(str(edited(llama_dir, tmp_path, **changes)), kv_cache_bytes=2**22, space=SpacePolicy(**policy))
    with pytest.raises(SpaceUnavailable, match=message):
        llm.generate([[1, 2]], SamplingParams(), speculate="sdsat")
    assert llm.generate([[1, 2]], SamplingParams(max_new_tokens=3), speculate="none")[0].finish_reason


@pytest.mark.parametrize("method", ["space", "sdsat"])
def test_both_recipes_and_a_shared_id_list_are_accepted(llama_dir, tmp_path, method):
    folder = edited(llama_dir, tmp_path, space_method=method, sdsat_adaptive_token_ids=[95, 95, 95])
    llm = LLM(str(folder), kv_cache_bytes=2**22, space=SpacePolicy(k_max=2))
    params = SamplingParams(max_new_tokens=8)
    assert llm.generate([[1, 2, 3]], params, speculate="sdsat")[0].token_ids == \
        llm.generate([[1, 2, 3]], params, speculate="none")[0].token_ids


@pytest.mark.parametrize("bad", [dict(speculate_mode="medusa"), dict(sdsat_tree_sizes=(4, 0)), dict(sdsat_tree_sizes=())])
def test_bad_sdsat_settings_fail_at_start_naming_the_setting(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SpacePolicy(**bad)


def test_policy_mode_is_the_default_for_requests(llama_dir):
    llm = LLM(str(llama_dir), kv_cache_bytes=2**22, space=SpacePolicy(k_max=3, speculate_mode="sdsat"))
    seq = llm.engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=4))
    assert seq.sdsat and seq.speculate
    assert not llm.engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=4), "space").sdsat


def test_preemption_under_a_tiny_cache_keeps_outputs(llama_dir):
    prompts = [[1] + list(range(5 + i, 25 + i)) for i in range(6)]
    params = SamplingParams(max_new_tokens=24)
    roomy = LLM(str(llama_dir), dtype="float32", kv_cache_bytes=2**22, block_size=4)
    ref = reference(roomy, prompts, params)
    tight = LLM(str(llama_dir), dtype="float32", kv_cache_bytes=512 * 4 * 40, block_size=4, space=SpacePolicy(k_max=3))
    assert [o.token_ids for o in tight.generate(prompts, params, speculate="sdsat")] == ref
    assert tight.engine.scheduler.num_preemptions > 0  # the cache really was too small
    assert all_blocks_back(tight)


def test_sdsat_with_the_fixed_layout_policy(llama_dir, monkeypatch):
    """planner=False (the paper's SPACE layout) changes nothing for SDSAT sequences."""
    llm = LLM(str(llama_dir), kv_cache_bytes=2**24, block_size=4, space=SpacePolicy(k_max=3, planner=False))
    params = SamplingParams(max_new_tokens=20)
    ref = reference(llm, PROMPTS[:4], params)
    oracle_drafts(monkeypatch, {tuple(p): r for p, r in zip(PROMPTS[:4], ref)}, 0.2, seed=4)
    outs = llm.generate(PROMPTS[:4], params, speculate="sdsat")
    assert [o.token_ids for o in outs] == ref
    assert sum(o.stats.num_steps for o in outs) < sum(len(r) for r in ref)
    assert all_blocks_back(llm)
