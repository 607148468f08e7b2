"""Packed oneDNN weights (model/prepack.py) change the speed of a step, never its bits; and the
planner's costs for mask groups (a gated adapter's fixed cost per step, judged apart from trees)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.test_tree import chain_tree
from tgi_space.bench import humaneval_prompts
from tgi_space.config import EngineConfig, SpacePolicy, resolve_dtype
from tgi_space.llm import LLM
from tgi_space.model.prepack import Panels, native_bf16_gemm, packed_linear, packing, panel_kernel
from tgi_space.planner import LatencyCurve, Proposal, plan
from tgi_space.sampling import SamplingParams
from tgi_space.speculation import (
    EXPLORE_BURST, EXPLORE_EVERY, EXPLORE_FRACTION, MASKS_EXPLORE_EVERY, MAX_EXPLORE_EVERY, MAX_LOSS_EXPLORE_EVERY, PLAIN_EVERY,
    PLAIN_BURST, PLAIN_MISSING_EVERY, RATE_WINDOW, Speculator, gate_margin,
    _explore, _loss_period, explore_share,
)

MODEL = Path(__file__).resolve().parents[1] / "models" / "tiny-space-py"


DEFAULT = resolve_dtype("auto", "cpu")  # bfloat16 on CPUs with native bf16 GEMMs, float32 on the others (AVX2)
TORCH_DTYPE = {"bfloat16": torch.bfloat16, "float32": torch.float32}[DEFAULT]


@pytest.fixture(scope="module")
def packed() -> LLM:
    llm = LLM(str(MODEL))
    assert llm.engine.config.dtype == DEFAULT
    assert llm.engine.packed, "the CPU default packs the projection weights"
    return llm


def _alone(layer, x: torch.Tensor) -> torch.Tensor:
    """Each row of x by torch's own F.linear on the unpacked weight, one row at a time."""
    return torch.cat([F.linear(x[r : r + 1], layer.weight) for r in range(x.shape[0])])


def test_every_projection_row_has_the_bits_it_gets_alone(packed):
    """oneDNN (native bf16): exactly torch's F.linear on the unpacked weight, one row at a time. Panels: every
    row the bits it gets in a call of its own, whatever the row count, and F.linear's values in float64."""
    model, ctx = packed.engine.model, packed.engine.model.ctx
    layers = [model.layers[0].self_attn.qkv_proj, model.layers[0].self_attn.o_proj,
              model.layers[0].mlp.gate_up_proj, model.layers[-1].mlp.down_proj, model.lm_head]
    gen = torch.Generator().manual_seed(1)
    kind = packing("cpu", DEFAULT)
    with torch.inference_mode():
        for layer in layers:
            for m in (1, 2, 5, 17, 33, 64, 100, 300):
                x = torch.randn(m, layer.in_features, generator=gen).to(TORCH_DTYPE)
                ours = ctx.linear(layer, x)
                if kind == "onednn":
                    assert torch.equal(ours, _alone(layer, x)), (layer, m)
                    continue
                alone = torch.cat([ctx.linear(layer, x[r : r + 1]) for r in range(m)])
                assert torch.equal(ours, alone), (layer, m)
                ref = F.linear(x.double(), layer.weight.double())
                torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_panel_gemm_rows_are_batch_invariant_and_right(dtype):
    """The panel kernel on its own, both dtypes, odd shapes (a partial panel, K not a multiple of 8), bias."""
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(37, 100, generator=gen) * 0.1).to(torch_dtype)
    bias = torch.randn(37, generator=gen).to(torch_dtype)
    x = torch.randn(50, 100, generator=gen).to(torch_dtype)
    panels = Panels(panel_kernel().pack_panels(w), 37)
    alone = torch.cat([packed_linear(panels, bias, x[r : r + 1]) for r in range(50)])
    for m in (1, 2, 6, 7, 13, 48, 49, 50):
        assert torch.equal(packed_linear(panels, bias, x[:m]), alone[:m]), m
    ref = F.linear(x.double(), w.double(), bias.double()).to(torch_dtype).double()
    tol = 1e-5 if dtype == "float32" else 1e-2
    torch.testing.assert_close(alone.double(), ref, rtol=tol, atol=tol)


def test_float32_weights_that_bf16_holds_are_packed_as_bf16_with_the_same_bits():
    """A bf16 checkpoint run in float32: its weights are packed as bf16 panels (half the bytes) and the
    float32 results keep every bit of float32 panels; weights bf16 cannot hold stay float32."""
    from tgi_space.model.prepack import narrowest_exact

    gen = torch.Generator().manual_seed(4)
    w = (torch.randn(37, 100, generator=gen) * 0.1).to(torch.bfloat16).float()
    x = torch.randn(20, 100, generator=gen)
    assert narrowest_exact(w).dtype == torch.bfloat16
    assert narrowest_exact(w + 1e-4).dtype == torch.float32  # not exact in bf16: kept
    narrow = Panels(panel_kernel().pack_panels(narrowest_exact(w)), 37)
    wide = Panels(panel_kernel().pack_panels(w), 37)
    assert narrow.panels.dtype == torch.bfloat16 and wide.panels.dtype == torch.float32
    ours = packed_linear(narrow, None, x)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, packed_linear(wide, None, x))
    torch.testing.assert_close(ours.double(), F.linear(x.double(), w.double()), rtol=1e-5, atol=1e-5)


def test_greedy_tokens_are_those_of_unpacked_weights(packed):
    """oneDNN: packing changes no bit (tokens and logprobs). Panels: another summation order than MKL's
    F.linear (which is not batch-invariant), so the check is the same tokens, plain and speculative."""
    unpacked = LLM(str(MODEL), dtype=DEFAULT, prepack_weights=False)
    assert not unpacked.engine.packed
    prompts = humaneval_prompts(3)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True, top_n_tokens=2)
    for mode in ("none", "space"):
        a = packed.generate(prompts, [params] * 3, speculate=mode)
        b = unpacked.generate(prompts, [params] * 3, speculate=mode)
        assert [o.token_ids for o in a] == [o.token_ids for o in b]
        if packing("cpu", DEFAULT) == "onednn":
            assert [[(t.logprob, t.top) for t in o.tokens] for o in a] == [[(t.logprob, t.top) for t in o.tokens] for o in b]


@pytest.mark.parametrize("dtype, device", [("float16", "cpu"), ("bfloat16", "cuda")])
def test_prepack_where_it_does_not_apply_is_refused_naming_the_setting(dtype, device):
    with pytest.raises(ValueError, match="prepack_weights"):
        EngineConfig(model_dir=str(MODEL), dtype=dtype, device=device, prepack_weights=True)
    assert EngineConfig(model_dir=str(MODEL), dtype=dtype, device=device).prepack_weights is False


def test_packing_follows_the_cpu():
    assert packing("cpu", "float32") == "panels"
    assert packing("cpu", "bfloat16") == ("onednn" if native_bf16_gemm() else "panels")
    assert packing("cuda", "float32") is None


def test_auto_dtype_follows_the_cpu_and_bad_dtypes_are_named():
    assert EngineConfig(model_dir=str(MODEL)).dtype == ("bfloat16" if native_bf16_gemm() else "float32")
    assert EngineConfig(model_dir=str(MODEL), device="cuda", prepack_weights=False).dtype == "bfloat16"
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16, float16"):
        EngineConfig(model_dir=str(MODEL), dtype="fp8")


def test_a_costly_mask_group_is_sent_only_when_worth_its_fixed_cost():
    proposal = Proposal(1, chain_tree([0.9, 0.1]), 3, 2.0)
    flat = LatencyCurve({1: 1.0, 64: 1.0})
    assert plan([proposal], flat, 512, group_cost=0.0)[0].anchors  # free: sent
    # 1.9 tokens without a group; with it at most 1.9 + 2.0 tokens for 1 + 3 seconds: not worth it
    assert plan([proposal], flat, 512, group_cost=3.0)[0].anchors == []
    assert plan([proposal], flat, 512, group_cost=0.5)[0].anchors  # 3.9 / 1.5 > 1.9 / 1


def _speculator() -> Speculator:
    return Speculator(SpacePolicy(), 4, lambda *a: 1e-3, max_batch=1, max_probe_rows=64)


def test_a_step_that_only_sends_mask_groups_is_judged_with_the_step_verifying_their_drafts():
    """Alone, a groups-only step looks slow (one token, the adapter's cost) and the step after it fast
    (the drafts, no groups): both are the price and the gain of mask drafting, rated together."""
    spec = _speculator()
    spec.observe_rate(1, 0.004, 1, "lead")
    assert not spec.rates["1/greedy"]  # nothing until its drafts are verified
    spec.observe_rate(1, 0.003, 3, "tree")
    assert spec.rates["1/greedy"] == {"masks": pytest.approx(4 / 0.007), "spec": pytest.approx(4 / 0.007)}
    spec.observe_rate(1, 0.003, 3, "tree")  # a tree step on its own is a tree step
    assert spec.rates["1/greedy"]["tree"] == pytest.approx(3 / 0.003)
    assert spec.rates["1/greedy"]["spec"] == pytest.approx(7 / 0.010)  # speculation: all its steps together


def test_a_groups_only_step_is_not_paired_across_a_change_of_batch_size():
    """The step verifying a lead's drafts is the next one; if the batch changed size in between (a request
    finished), the lead's drafts were verified in another batch: neither step is rated as masks, and the lead
    must not wait to be paired with some later, unrelated step of its old size."""
    spec = _speculator()
    spec.observe_rate(2, 0.004, 2, "lead")
    spec.observe_rate(1, 0.003, 3, "tree")  # a request left: batch 1 now
    assert spec.rates["1/greedy"] == {"tree": pytest.approx(3 / 0.003), "spec": pytest.approx(3 / 0.003)}
    spec.observe_rate(2, 0.002, 2, "plain")  # (the first plain step after speculative ones is not rated)
    spec.observe_rate(2, 0.002, 2, "plain")
    spec.observe_rate(2, 0.003, 6, "tree")
    assert spec.rates["2/greedy"] == {"plain": pytest.approx(1000), "tree": pytest.approx(2000),
                                      "spec": pytest.approx(2000)}  # no stale lead


def test_speculation_is_judged_by_all_its_steps_together_not_by_its_best_kind():
    """With the masks as the only drafter, tree steps verify what masked steps drafted: at 8 sequences (shard,
    equal lengths) tree steps were rated 1.5x plain and masked steps 0.85x, and speculating lost 15% while the
    best kind said it paid. Speculation is worth its steps' tokens over their seconds, all kinds together."""
    spec = _speculator()
    for _ in range(3):
        spec.observe_rate(8, 0.010, 8, "plain", outside=0.0)  # 800 tok/s
        spec.observe_rate(8, 0.032, 16, "masks", outside=0.0)  # 500 tok/s
        spec.observe_rate(8, 0.010, 13, "tree", outside=0.0)  # 1300 tok/s
    assert spec.rates["8/greedy"]["tree"] > spec.rates["8/greedy"]["plain"]
    # six speculative steps, the slowest left out: 71 tokens in 94 ms, 755 tok/s
    assert spec.rates["8/greedy"]["spec"] == pytest.approx((2 * 16 + 3 * 13) / (2 * 0.032 + 3 * 0.010))
    tries = [spec._measured_to_pay("8/greedy") for _ in range(EXPLORE_EVERY)]
    assert sum(tries) == EXPLORE_BURST  # explores only


def test_mask_groups_measured_to_lose_against_plain_steps_stop_but_trees_go_on():
    spec = _speculator()
    spec.observe_rate(1, 1.0, 200, "plain")
    spec.observe_rate(1, 1.0, 100, "masks")
    spec.observe_rate(1, 1.0, 600, "tree")
    assert spec._measured_to_pay("1/greedy")  # trees pay: speculation goes on
    sent = [spec._masks_measured_to_pay("1/greedy") for _ in range(4 * MASKS_EXPLORE_EVERY)]
    assert sum(sent) == 4 * EXPLORE_BURST  # EXPLORE_BURST exploring steps in MASKS_EXPLORE_EVERY
    first = [i for i, x in enumerate(sent[:MASKS_EXPLORE_EVERY]) if x]
    assert first == list(range(first[0], first[0] + EXPLORE_BURST))  # consecutive: drafts get verified


def test_mask_groups_are_not_judged_against_tree_only_steps():
    """Steps with trees but no group follow good drafts; masks that beat plain steps keep going."""
    spec = _speculator()
    spec.observe_rate(1, 1.0, 300, "masks")
    spec.observe_rate(1, 1.0, 200, "plain")
    spec.observe_rate(1, 1.0, 900, "tree")
    assert all(spec._masks_measured_to_pay("1/greedy") for _ in range(64))


def test_sampled_steps_measured_to_lose_do_not_stop_greedy_speculation():
    spec = _speculator()
    spec.observe_rate(1, 1.0, 200, "plain")
    spec.observe_rate(1, 1.0, 250, "plain", sampled=True)
    spec.observe_rate(1, 1.0, 600, "tree")
    spec.observe_rate(1, 1.0, 90, "tree", sampled=True)
    spec.observe_rate(1, 1.0, 80, "masks", sampled=True)
    assert all(spec._measured_to_pay("1/greedy") for _ in range(16))
    period = _loss_period(250 / 85, EXPLORE_BURST)  # speculative steps (170 tokens in 2 s) lose 2.9x
    assert sum(spec._measured_to_pay("1/sampled") for _ in range(period)) == EXPLORE_BURST  # explores only


def _runs(flags: list[bool]) -> list[int]:
    """The lengths of the runs of True in `flags`."""
    runs, n = [], 0
    for flag in [*flags, False]:
        if flag:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


@pytest.mark.parametrize("burst", [1, 2, 3])
def test_exploring_bursts_stay_whole_and_spaced_when_the_period_moves(burst):
    """The exploring period follows measured rates, so it moves from step to step. Bursts must still come
    whole (an SDSAT draft pass without its verify pass costs a pass and measures nothing) and no closer than
    the shortest period allows. A count taken modulo the moving period (the code before 2026-12-07) starts
    bursts at random steps: on these periods it started 45 / 84 / 127 bursts (burst 1 / 2 / 3), most of one
    step, some 2 steps apart, where at most 52 fit."""
    periods = [58 + (7 * i) % 11 for i in range(3000)]  # 58..68, moving every step
    gated: dict = defaultdict(int)
    gated["k"] = 5000  # deep into a stretch (at batch 1 the count never restarted)
    flags = [_explore(gated, "k", every, burst) for every in periods]
    runs = _runs(flags)
    assert runs and set(runs) == {burst}  # every burst whole
    starts = [i for i, flag in enumerate(flags) if flag and (i == 0 or not flags[i - 1])]
    assert min(b - a for a, b in zip(starts, starts[1:])) >= min(periods)
    assert len(runs) <= len(periods) // min(periods) + 1


def test_a_period_that_shrinks_below_the_count_starts_its_burst_at_once():
    gated: dict = defaultdict(int)
    assert not any(_explore(gated, "k", 96, 3) for _ in range(50))  # 50 of 93 kept steps
    assert [_explore(gated, "k", 24, 3) for _ in range(4)] == [True, True, True, False]


def test_time_outside_the_engine_is_learnt_and_idle_pauses_are_not():
    import time as _time

    spec = _speculator()
    spec.step_done()
    _time.sleep(0.02)
    spec._observe_gap(1)
    assert 0.0015 < spec.outside[1] < 0.01  # one EWMA step (0.1) of a >= 20 ms gap
    before = spec.outside[1]
    spec.step_done()
    _time.sleep(0.3)  # longer than MAX_GAP: nothing was waiting, not a serving cost
    spec._observe_gap(1)
    assert spec.outside[1] == before


def test_a_fixed_cost_outside_the_forward_makes_more_rows_worth_sending():
    """Rows that cost a forward each do not pay for less than a token each; with a serving cycle three times
    the forward around every step, they do (tokens per second of the whole cycle)."""
    proposal = Proposal(1, chain_tree([0.9, 0.8, 0.7]), 0, 0.0)
    steep = LatencyCurve({1: 1.0, 4: 4.0})  # every row costs as much as the one-row forward
    assert plan([proposal], steep, 512)[0].nodes == []
    assert plan([proposal], lambda rows, n: steep(rows) + 3.0, 512)[0].nodes == [0, 1, 2]


def test_rows_judged_unable_to_pay_still_draft_now_and_then():
    """Nothing sent means nothing learnt: a low value per node must not stop speculation for good."""
    spec = Speculator(SpacePolicy(latency_curve=None), 4, lambda *a: 1e-3 * (1 + a[1]), max_batch=1, max_probe_rows=64)
    spec.value_per_row[False] = 0.0  # a bad patch: no sent node was accepted lately
    assert not spec._rows_could_pay([(None, None)], 1, False)
    planned = [(SimpleNamespace(seq_id=0), None)]
    tries = [spec._speculating(planned, [0], "1/greedy", False) == [0] for _ in range(4 * EXPLORE_EVERY)]
    assert sum(tries) == 4 * EXPLORE_BURST
    assert spec.value_per_row[True] == 0.5  # sampled steps keep their own figure


def _gated_speculator(num_seqs: int, drafters: tuple[str, ...] = ("masks", "suffix")) -> Speculator:
    """A speculator whose rates say speculation loses at this batch size (plain 1000 tok/s, trees 900: by
    10%, so the exploring period is the shortest, EXPLORE_EVERY)."""
    policy = SpacePolicy(latency_curve=None, drafters=drafters)
    spec = Speculator(policy, 4, lambda *a: 1e-3, max_batch=64, max_probe_rows=64)
    spec.value_per_row[False] = 1.0  # rows could pay: only the measured rates gate
    spec.observe_rate(num_seqs, num_seqs / 1000, num_seqs, "plain")
    spec.observe_rate(num_seqs, num_seqs / 900, num_seqs, "tree")
    return spec


def test_rates_of_different_batch_sizes_are_never_compared():
    """A step's wall time holds per-sequence work the probed surface does not: only a speculative rate and a plain
    rate measured at one batch size are compared; a size with only one of them takes the verdict (the ratio) of the
    nearest size that has both."""
    spec = Speculator(SpacePolicy(latency_curve=None), 4, lambda *a: 1e-3, max_batch=64, max_probe_rows=64)
    spec.observe_rate(8, 8 / 1000, 8, "plain")
    spec.observe_rate(8, 0.010, 13, "tree")  # at 8: trees 1.3x plain
    spec.observe_rate(16, 16 / 1500, 16, "plain")  # (not rated: the first plain step after a speculative one)
    spec.observe_rate(16, 16 / 1500, 16, "plain")  # plain at 16 beats trees at 8; no tree step at 16 yet
    assert spec._comparison("16/greedy", ("tree", "masks")) == (pytest.approx(1300), pytest.approx(1000))
    assert spec._measured_to_pay("16/greedy")
    spec.observe_rate(12, 12 / 1500, 12, "plain")
    spec.observe_rate(12, 0.010, 12, "tree")  # at 12: trees 0.8x plain, and 12 is nearer 16 than 8 is
    assert spec._comparison("16/greedy", ("tree", "masks")) == (pytest.approx(1200), pytest.approx(1500))
    assert not spec._measured_to_pay("16/greedy")
    spec.observe_rate(16, 0.010, 19, "tree")  # at 16 itself: 1900 against 1500, whatever the others say
    assert spec._comparison("16/greedy", ("tree", "masks")) == (pytest.approx(1900), pytest.approx(1500))
    assert spec._measured_to_pay("16/greedy") or spec._measured_to_pay("16/greedy")  # (unless a plain re-measure)
    assert spec._comparison("16/sampled", ("tree",)) == (None, None)  # sampled steps never borrow greedy figures
    spec.observe_rate(64, 0.010, 64, "plain")  # (passed over: right after a speculative step)
    spec.observe_rate(64, 0.010, 64, "plain")
    assert spec._comparison("64/greedy", ("tree",)) == (None, pytest.approx(6400))  # nor sizes far away (16)


def test_exploring_a_large_batch_drafts_for_a_share_of_it_that_turns_over():
    spec = _gated_speculator(64)
    planned = [(SimpleNamespace(seq_id=100 + i), None) for i in range(64)]
    steps = [spec._speculating(planned, list(range(64)), "64/greedy", False) for _ in range(24 + 48 + 96 + 96)]
    drafting = [s for s in steps if s]
    assert len(drafting) == 4 * EXPLORE_BURST  # EXPLORE_BURST steps a period ...
    assert all(len(s) == 64 // EXPLORE_FRACTION for s in drafting)  # ... each for a quarter of the batch
    bursts = [drafting[i : i + EXPLORE_BURST] for i in range(0, len(drafting), EXPLORE_BURST)]
    assert all(b[0] == b[1] == b[2] for b in bursts)  # a burst keeps its share: drafts get verified
    assert len({tuple(b[0]) for b in bursts}) == len(bursts)  # and the share turns over between bursts
    assert len(set().union(*map(set, drafting))) > 64 // EXPLORE_FRACTION


def test_a_batch_that_keeps_losing_explores_less_often_until_speculation_pays():
    spec = _gated_speculator(16)
    planned = [(SimpleNamespace(seq_id=i), None) for i in range(16)]
    starts = [i for i in range(500) if spec._speculating(planned, list(range(16)), "16/greedy", False)][::EXPLORE_BURST]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert gaps[:3] == [2 * EXPLORE_EVERY, 4 * EXPLORE_EVERY, MAX_EXPLORE_EVERY]  # doubling, then capped
    assert set(gaps[3:]) == {MAX_EXPLORE_EVERY}
    spec.observe_rate(16, 0.016, 64, "tree")  # speculation measured to pay: the period is reset
    spec.rates["16/greedy"]["spec"] = 4000.0
    assert spec._measured_to_pay("16/greedy")
    spec.rates["16/greedy"]["spec"] = 900.0
    tries = [spec._measured_to_pay("16/greedy") for _ in range(EXPLORE_EVERY)]
    assert sum(tries) == EXPLORE_BURST


def test_neighbouring_batch_sizes_share_one_exploring_period():
    """Under steady load the batch size wanders (33, 34, ... 40 sequences): one losing period backs off for all
    of them together, so wandering does not explore more often than one size would."""
    spec = _gated_speculator(32)
    for size in range(33, 41):  # every size measured to lose like 32
        spec.rates[f"{size}/greedy"] = dict(spec.rates["32/greedy"])
    sizes = [33 + (i * 5) % 8 for i in range(500)]
    wandering = sum(spec._measured_to_pay(f"{n}/greedy") for n in sizes)
    alone = _gated_speculator(32)
    steady = sum(alone._measured_to_pay("32/greedy") for _ in sizes)
    assert wandering == steady < 500 // 8
    far = _gated_speculator(16)  # a size in another class keeps its own period
    far.rates["32/greedy"] = dict(spec.rates["32/greedy"])
    tries = [far._measured_to_pay("16/greedy") for _ in range(EXPLORE_EVERY)]
    assert sum(tries) == EXPLORE_BURST and not far._explore_period.get("32/greedy")


def test_one_sequence_keeps_exploring_every_period():
    """At batch 1 a try costs a few rows of one sequence; a regime that mixes temperatures must not back off."""
    spec = _gated_speculator(1)
    tries = [spec._measured_to_pay("1/greedy") for _ in range(8 * EXPLORE_EVERY)]
    assert sum(tries) == 8 * EXPLORE_BURST


@pytest.mark.parametrize("slowdown, period", [(1.1, EXPLORE_EVERY), (2.0, 75), (4.0, 225), (50.0, MAX_LOSS_EXPLORE_EVERY)])
def test_tries_are_spaced_by_how_much_speculation_loses(slowdown, period):
    """Each try of a burst costs about `slowdown` plain steps per token: EXPLORE_BURST * (slowdown - 1) extra in
    every `period` steps is EXPLORE_OVERHEAD (4%) of the time (T = 1 at batch 1 lost 15% with a fixed period)."""
    assert period == max(EXPLORE_EVERY, min(MAX_LOSS_EXPLORE_EVERY, round(3 * (slowdown - 1) / 0.04)))
    spec = _gated_speculator(1)
    spec.rates["1/greedy"]["spec"] = 1000 / slowdown
    tries = [spec._measured_to_pay("1/greedy") for _ in range(4 * period)]
    assert sum(tries) == 4 * EXPLORE_BURST
    starts = [i for i, t in enumerate(tries) if t][::EXPLORE_BURST]
    assert [b - a for a, b in zip(starts, starts[1:])] == [period] * 3


def test_hot_sampling_is_governed_apart_from_warm_sampling_and_greedy():
    from tgi_space.sampling import SamplingParams as P
    from tgi_space.speculation import sampling_regime

    def step(*params):
        return [(SimpleNamespace(params=p), None) for p in params]

    assert sampling_regime(step(P(), P())) == "greedy"
    assert sampling_regime(step(P(), P(do_sample=True, temperature=0.2, top_p=0.95))) == "sampled"
    assert sampling_regime(step(P(do_sample=True, temperature=0.2), P(do_sample=True, temperature=1.0))) == "hot"


def test_a_small_batch_explores_whole():
    spec = _gated_speculator(4)
    planned = [(SimpleNamespace(seq_id=i), None) for i in range(4)]
    steps = [spec._speculating(planned, [0, 1, 2, 3], "4/greedy", False) for _ in range(EXPLORE_EVERY)]
    assert [s for s in steps if s] == [[0, 1, 2, 3]] * EXPLORE_BURST
    assert explore_share([0, 1, 2, 3], [7, 8, 9, 10], 5) == [0, 1, 2, 3]


def test_an_exploring_share_is_judged_as_if_everybody_had_drafted():
    """16 of 64 sequences drafted; the step emitted 32 extra tokens in 4 ms more than a plain step
    (64 tokens in 64 ms). Had all 64 drafted: 64 + 128 tokens in 64 + 16 ms, 2400 tok/s."""
    spec = _gated_speculator(64)
    planned = [(SimpleNamespace(seq_id=i), None) for i in range(64)]
    share = []
    while not share:
        share = spec._speculating(planned, list(range(64)), "64/greedy", False)
    assert spec._step_scale == 4.0
    spec.rates["64/greedy"].pop("tree")
    spec.observe_rate(64, 0.068, 96, "tree")
    assert spec.rates["64/greedy"]["tree"] == pytest.approx(192 / 0.080)
    spec._step_scale = 1.0  # a step where everybody drafts is taken as it is
    spec.observe_rate(64, 0.068, 96, "masks")
    assert spec.rates["64/greedy"]["masks"] == pytest.approx(96 / 0.068)


@pytest.mark.parametrize("drafters", [("masks", "suffix"), ("masks",)])
def test_exploring_bursts_measure_trees_alone_and_with_groups_in_turn(drafters):
    """Else a kind measured once to lose (exploring steps sent groups every time) never shows trees alone pay.
    With masks the only drafter there are no trees without groups: every burst sends them."""
    spec = _gated_speculator(4, drafters)
    planned = [(SimpleNamespace(seq_id=i), None) for i in range(4)]
    bursts = []
    for _ in range(24 + 48 + 96 + 96):  # four periods (the period doubles while speculation keeps losing)
        if spec._speculating(planned, [0, 1, 2, 3], "4/greedy", False):
            bursts.append(spec._sends_masks("4/greedy"))
    groups = bursts[::EXPLORE_BURST]
    assert len(groups) == 4 and all(b == bursts[i * EXPLORE_BURST + 1] for i, b in enumerate(groups))
    assert groups == ([False, True, False, True] if "suffix" in drafters else [True] * 4)


def test_warmed_gemm_kernels_change_no_bit():
    """Building oneDNN's kernels for every decode row count at start-up only moves when they are built."""
    from tgi_space.model.prepack import KERNEL_CACHE, _shapes, warm_rows

    prompts = [humaneval_prompts(3)[i] for i in range(3)]
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    cold = LLM(str(MODEL), warm_gemm_rows=0).generate(prompts, params, speculate="space")
    warm = LLM(str(MODEL))
    assert len(_shapes(warm.engine.packed)) * warm_rows(warm.engine.packed, 10**6) <= KERNEL_CACHE
    out = warm.generate(prompts, params, speculate="space")
    assert [o.token_ids for o in out] == [o.token_ids for o in cold]
    assert [[t.logprob for t in o.tokens] for o in out] == [[t.logprob for t in o.tokens] for o in cold]


def test_warm_gemm_rows_is_checked_at_start_up():
    with pytest.raises(ValueError, match="warm_gemm_rows"):
        EngineConfig(model_dir=str(MODEL), warm_gemm_rows=-1)


def test_rows_are_priced_without_the_steps_drafting_time():
    """Drafting and verification are priced per sequence; a step's rows must not be charged for them too."""
    spec = Speculator(SpacePolicy(latency_curve=None), 4, lambda b, rows, *g: 1e-3 * rows, max_batch=1,
                      max_probe_rows=64)
    surface = spec.latency()
    plain, extra = surface(1, 1), surface(9, 1) - surface(1, 1)
    for _ in range(5):
        spec._busy = 0.004  # this step's drafting
        spec.end_step(1, 8, 4)
        spec.observe_step(1, 9, 1, spec.plain_factor[1, False] * plain + 1.0 * extra + 0.004)  # the rows cost what probed
    assert spec.marginal_factor[1, False] == pytest.approx(1.0)  # charged the drafting too: (extra + 4 ms) / extra


def test_a_few_stalled_steps_do_not_price_rows_out():
    """On a shared CPU a step is now and then stalled by another process: the cost corrections are
    medians of recent steps, so a stall of 20 ms in one step in eight moves them little (a running mean
    of the per-step ratio ends at its clamp: 20 ms over a probed cost of a fraction of a millisecond)."""
    spec = Speculator(SpacePolicy(latency_curve=None), 4, lambda b, rows, *g: 1e-3 * rows, max_batch=1,
                      max_probe_rows=64)
    surface = spec.latency()
    plain = surface(1, 1)
    for step in range(64):
        stall = 0.020 if step % 8 == 7 else 0.0
        spec.observe_step(1, 1, 1, 1.1 * plain + stall)  # plain steps cost 1.1x what probed
        rows = 2 + step % 3  # one to three extra rows, costing 1.5x what probed
        spec.observe_step(1, rows, 1, spec.plain_factor[1, False] * plain + 1.5 * (surface(rows, 1) - plain) + stall)
    assert spec.plain_factor[1, False] == pytest.approx(1.1, rel=0.05)
    assert spec.marginal_factor[1, False] == pytest.approx(1.5, rel=0.1)


def test_row_costs_are_learnt_apart_for_greedy_and_sampled_steps():
    """A sampled step's filtering and draws cost more per sequence than greedy's argmax: learnt together, the
    cost corrections priced plain rows dear and extra rows cheap for the greedy requests of the same engine.
    Each regime learns its own."""
    llm = LLM(str(MODEL), space=SpacePolicy(drafters=("suffix",)))
    prompt = llm.tokenizer.encode("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n")
    spec = llm.engine.speculator
    seen = lambda sampled: sum(len(r._seen) for ratios in (spec._plain_ratio, spec._marginal_ratio)
                               for (_, s), r in ratios.items() if s == sampled)
    llm.generate([prompt], SamplingParams(max_new_tokens=24, do_sample=True, temperature=1.0, seed=1))
    assert spec.curve is not None and seen(False) == 0 and seen(True) > 0  # sampled steps taught their own only
    sampled = seen(True)
    llm.generate([prompt], SamplingParams(max_new_tokens=24))
    assert seen(False) > 0 and seen(True) == sampled
    assert set(spec.info()["plain_factor"]) >= {"1/greedy", "1/sampled"}


def test_robust_ratio_is_a_weighted_median_of_recent_steps():
    from tgi_space.planner import RobustRatio

    ratio = RobustRatio(2.0, lo=0.5, hi=6.0, window=5)
    assert ratio.value == 2.0  # the prior until a step is seen
    assert ratio.observe(3.0, 1.0) == 3.0
    ratio.observe(1.0, 10.0)  # a heavy observation at 0.1 outweighs the light one at 3.0
    assert ratio.value == pytest.approx(0.5)  # the median 0.1, clamped to lo
    for _ in range(5):
        ratio.observe(4.0, 1.0)  # the window forgets the heavy one after five more
    assert ratio.value == 4.0
    assert ratio.observe(100.0, 1.0) == 4.0  # one outlier among five does not move it


def test_a_step_is_judged_with_its_own_time_outside_the_engine():
    """A step that emitted many tokens keeps the server and the router busy longer before the next step:
    its rate counts that gap, not the batch size's running mean."""
    import time as _time

    spec = _speculator()
    spec.defer_rate(1, 0.010, 4, "tree")
    assert "tree" not in spec.rates["1/greedy"]  # not before its gap is known
    spec.step_done()
    _time.sleep(0.03)
    spec._observe_gap(1)
    rate = spec.rates["1/greedy"]["tree"]
    assert 4 / 0.06 < rate < 4 / 0.04  # 4 tokens in 10 ms + >= 30 ms outside, not 10 ms + the mean (~3 ms)


def test_a_call_that_arrives_ends_the_gap_of_the_step_before():
    """A Prefill tokenizes and checks its batch before its step is planned: that is the new requests' cost.
    The gap of the decode step before it ends when the call arrives (`close_gap`), not when it is planned."""
    import time as _time

    spec = _speculator()
    spec.defer_rate(1, 0.010, 4, "tree")
    spec.step_done()
    spec.close_gap()  # the call arrived at once
    _time.sleep(0.03)  # ... and spent 30 ms before planning its step
    spec._observe_gap(1)
    assert spec.rates["1/greedy"]["tree"] > 4 / 0.02  # 4 tokens in 10 ms + ~0 outside, not + 30 ms


def test_a_rate_is_the_median_of_the_kinds_recent_steps():
    """A step now and then is slow for reasons of its own (another process on a shared core): one in five
    does not move the rate; a lasting change (three in five) does."""
    spec = _speculator()
    for _ in range(4):
        spec.observe_rate(1, 0.010, 10, "plain", outside=0.0)  # 1000 tok/s
    spec.observe_rate(1, 0.040, 10, "plain", outside=0.0)  # one slow step: 250 tok/s
    assert spec.rates["1/greedy"]["plain"] == pytest.approx(1000)  # (a running mean 0.8/0.2 gave 850)
    spec.observe_rate(1, 0.040, 10, "plain", outside=0.0)
    spec.observe_rate(1, 0.040, 10, "plain", outside=0.0)
    assert spec.rates["1/greedy"]["plain"] == pytest.approx(250)  # three of the last five: it has changed
    assert RATE_WINDOW == 5


def test_speculation_judged_to_pay_still_re_measures_plain_steps():
    """A plain rate measured once (say, while the server warmed up) goes stale: PLAIN_BURST steps in a row stay
    plain after every PLAIN_EVERY - 1 speculative ones."""
    spec = _speculator()
    spec.observe_rate(1, 1.0, 100, "plain")
    spec.observe_rate(1, 1.0, 300, "tree")
    steps = [spec._measured_to_pay("1/greedy") for _ in range(4 * PLAIN_EVERY)]
    plain = [i for i, speculates in enumerate(steps) if not speculates]
    starts = [PLAIN_EVERY - 1 + j * (PLAIN_EVERY + PLAIN_BURST - 1) for j in range(4)]
    assert plain == [i + b for i in starts for b in range(PLAIN_BURST) if i + b < 4 * PLAIN_EVERY]


def test_a_larger_batch_speculates_only_when_measured_clearly_faster():
    """What step rates miss (replacements prefilled one by one once requests finish apart, plain steps slower
    among speculative ones) grows with the batch: at 8 sequences SDSAT rated 1.02x plain ran at 0.83x."""
    assert gate_margin("1/greedy") == 1.0
    assert gate_margin("8/greedy") == pytest.approx(1.15) and gate_margin("4/sampled") == pytest.approx(1.1)
    assert gate_margin("64/greedy") == gate_margin("4096/greedy") == pytest.approx(1.2)
    for batch, ratio, pays in [(1, 1.02, True), (8, 1.02, False), (8, 1.2, True), (64, 1.15, False)]:
        spec = _speculator()
        spec.observe_rate(batch, 0.010, batch, "plain", outside=0.0)
        spec.observe_rate(batch, 0.010, batch * ratio, "tree", outside=0.0)
        tries = [spec._measured_to_pay(f"{batch}/greedy") for _ in range(EXPLORE_EVERY)]
        assert (sum(tries) > EXPLORE_BURST) == pays, (batch, ratio)


def test_the_first_plain_step_after_speculative_ones_is_not_rated():
    """Through the shard at 16 sequences a plain step among speculative ones took 7-10 ms where plain steps in a
    row took 5.5: rated, three such steps made plain decoding look half as fast as it was."""
    spec = _speculator()
    spec.observe_rate(1, 0.010, 10, "plain", outside=0.0)  # 1000 tok/s
    spec.observe_rate(1, 0.010, 20, "tree", outside=0.0)
    spec.observe_rate(1, 0.020, 10, "plain", outside=0.0)  # right after a speculative step: passed over
    assert spec.rates["1/greedy"]["plain"] == pytest.approx(1000)
    spec.observe_rate(1, 0.020, 10, "plain", outside=0.0)  # the second in a row counts
    assert spec.rates["1/greedy"]["plain"] == pytest.approx(750)  # the median of 1000 and 500


def test_a_fresh_plain_rate_that_beats_speculation_stops_it():
    """The loop the refresh exists for: speculation pays against a stale plain rate until a plain step shows
    plain decoding is faster now; then it is gated (exploring only)."""
    spec = _speculator()
    spec.observe_rate(1, 1.0, 100, "plain")  # stale: plain steps are 5x faster now
    spec.observe_rate(1, 1.0, 300, "tree")
    for step in range(20 * PLAIN_EVERY):
        if not spec._measured_to_pay("1/greedy"):
            spec.observe_rate(1, 1.0, 500, "plain")
        else:
            spec.observe_rate(1, 1.0, 300, "tree")
    later = [spec._measured_to_pay("1/greedy") for _ in range(_loss_period(500 / 300, EXPLORE_BURST))]
    assert sum(later) == EXPLORE_BURST  # gated: exploring only


def test_a_missing_plain_rate_is_measured_soon():
    spec = _speculator()
    spec.observe_rate(1, 1.0, 300, "tree")
    steps = [spec._measured_to_pay("1/greedy") for _ in range(PLAIN_MISSING_EVERY + PLAIN_BURST - 1)]
    assert steps == [True] * (PLAIN_MISSING_EVERY - 1) + [False] * PLAIN_BURST
    spec.observe_rate(1, 1.0, 100, "plain")  # (passed over: right after a speculative step)
    spec.observe_rate(1, 1.0, 100, "plain")
    assert all(spec._measured_to_pay("1/greedy") for _ in range(PLAIN_EVERY - 1))


def test_an_exploring_share_measured_faster_than_plain_steps_costs_at_least_its_rows():
    """Scaling a share's extra time over plain steps' median scales its noise too: a step that ran 4 ms faster than
    that median (64 tokens in 64 ms) would say that drafting for everybody costs -16 ms. The extra time is never
    taken for less than the rows' predicted cost (`floor`): 64 + 128 tokens in 64 + 4 x 2 ms."""
    spec = _gated_speculator(64)
    planned = [(SimpleNamespace(seq_id=i), None) for i in range(64)]
    while not spec._speculating(planned, list(range(64)), "64/greedy", False):
        pass
    assert spec._step_scale == 4.0
    spec.rates["64/greedy"].pop("tree")
    spec.observe_rate(64, 0.060, 96, "tree", floor=0.002)
    assert spec.rates["64/greedy"]["tree"] == pytest.approx(192 / 0.072)
    spec.rates["64/greedy"].pop("tree")
    spec.observe_rate(64, 0.068, 96, "tree", floor=0.002)  # measured above its floor: as measured
    assert spec.rates["64/greedy"]["tree"] == pytest.approx(192 / 0.080)


def test_the_floor_of_a_step_is_what_its_extra_rows_and_groups_are_predicted_to_cost():
    spec = Speculator(SpacePolicy(latency_curve={1: 0.002, 8: 0.003, 16: 0.005, 64: 0.010}), 4, lambda *a: 1e-3,
                      max_batch=8, max_probe_rows=64)
    spec.mask_step_cost, spec.mask_factor = 0.0005, 2.0
    assert spec.rows_cost(8, 8) == 0.0  # plain decoding: no extra row
    assert spec.rows_cost(8, 16) == pytest.approx(0.002)  # t(16) - t(8) on the pinned curve
    assert spec.rows_cost(8, 12) == pytest.approx(0.001)  # (interpolated)
    assert spec.rows_cost(8, 16, masks=True) == pytest.approx(0.003)  # + the groups' fixed cost, as learnt


def test_an_exploring_share_drafts_within_its_share_of_the_row_budget():
    """A share stands for the whole batch, which would share the step's extra rows (max_step_query_tokens, 128):
    16 of 64 sequences may send 64 / 4 = 16 extra rows, not 64, or their tokens scaled by 4 promise what
    everybody drafting never gets."""
    from tgi_space.sampling import SamplingParams
    from tgi_space.sequence import Sequence
    from tgi_space.space import SeqPlan

    spec = _gated_speculator(64, drafters=("suffix",))
    text = [5, 6, 7, 8, 9, 10, 11, 12] * 6  # repeats itself: the suffix drafter has long continuations
    planned = []
    for i in range(64):
        seq = Sequence(i, text, SamplingParams(max_new_tokens=64), True, None)
        seq.num_cached = len(text) - 1
        planned.append((seq, SeqPlan(chain=[text[-1]], num_candidates=0, anchors=[], group_size=0,
                                     num_cached=len(text) - 1)))
    steps = [spec.plan(list(planned)) for _ in range(EXPLORE_EVERY)]
    explored = [sum(p.num_rows for _, p in out) for out in steps if any(p.num_candidates for _, p in out)]
    assert len(explored) == EXPLORE_BURST
    assert all(64 < rows <= 64 + 64 // 4 for rows in explored), explored
    spec._step_scale = 4.0
    assert spec._row_budget(64) == 80
    spec._step_scale = 1.0  # everybody drafting: the whole budget
    assert spec._row_budget(64) == 128 and spec._row_budget(200) == 200  # (a joined prefill: no extra row)


def test_the_latency_probe_leaves_the_live_cache_alone():
    """The planner probes t(rows, batch) on first use, which in `LLM.generate` is mid-generation: the probes'
    K/V must land in a cache of their own (they once wrapped around the live one, and the garbage they left
    in live slots changed the outputs of the requests decoding then)."""
    engine = LLM(str(MODEL), kv_cache_bytes=2**24).engine
    for cache in engine.kv_caches:
        cache.normal_()  # every slot stands for a live request's K/V
    before = [cache.clone() for cache in engine.kv_caches]
    engine._measure_rows(4, 16)
    engine._measure_rows(1, 9, 4)  # with a mask group
    assert all(torch.equal(a, b) for a, b in zip(before, engine.kv_caches))
