"""The governor's choice for SDSAT: its passes run while pairs of them are not measured slower than plain
steps; else the sequences decode plainly (drafts dropped) but for exploring bursts of a draft and a verify pass."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tgi_space.config import SpacePolicy
from tgi_space.llm import LLM
from tgi_space.sampling import SamplingParams
from tgi_space import speculation
from tgi_space.speculation import (
    EXPLORE_BURST_SDSAT, EXPLORE_EVERY, EXPLORE_MIN_SEQS, PLAIN_BURST, PLAIN_EVERY, Speculator,
)
from tgi_space.tree import ROOT, DraftTree

from tests.test_sdsat import PROMPTS


def _speculator(**policy) -> Speculator:
    return Speculator(SpacePolicy(**policy), 4, lambda *a: 1e-3, max_batch=64, max_probe_rows=64)


def _seqs(n: int, drafted: bool = False) -> list[tuple[SimpleNamespace, None]]:
    """Stand-ins for SDSAT sequences: what the gate reads (mode, sampling, id, pending drafts)."""
    def tree():
        t = DraftTree()
        t.add(7, ROOT, 0.9, "sdsat", 0.9)
        return t
    return [(SimpleNamespace(sdsat=True, params=SamplingParams(), seq_id=i, draft_tree=tree() if drafted else None), None)
            for i in range(n)]


def test_a_pinned_curve_forces_sdsat():
    spec = _speculator(latency_curve={1: 0.01})
    spec.observe_rate(1, 1.0, 1, "sdsat")
    spec.observe_rate(1, 1.0, 1, "sdsat")
    spec.observe_rate(1, 1.0, 100, "plain")
    assert spec.sdsat_passes(_seqs(1)) is None  # None: every SDSAT sequence runs its pass


def test_sdsat_steps_are_judged_in_pairs():
    """A draft pass alone emits one token for extra rows; the verify pass after it emits the drafts: a rate
    is recorded per pair (tokens over seconds of both), and a plain step in between breaks the pair."""
    spec = _speculator()
    spec.observe_rate(1, 1.0, 1, "sdsat")
    assert "sdsat" not in spec.rates["1/greedy"]
    spec.observe_rate(1, 3.0, 7, "sdsat")
    assert spec.rates["1/greedy"]["sdsat"] == pytest.approx(8 / 4)  # not the mean of 1/1 and 7/3
    spec.observe_rate(1, 1.0, 1, "sdsat")
    spec.observe_rate(1, 1.0, 1, "plain")
    spec.observe_rate(1, 1.0, 9, "sdsat")  # the first of a new pair, not the second of the broken one
    assert spec.rates["1/greedy"]["sdsat"] == pytest.approx(2.0)


def test_sdsat_pairs_are_judged_by_their_tokens_over_their_seconds_not_by_the_median_pair():
    """Pairs are unlike each other (a long accepted chain, a draft pass whose verify pass fell into a joined
    prefill): at 8 sequences in the shard the median pair said 1.36x plain where all of them said 1.07x and
    SDSAT ran at 0.93x. Three quick pairs and two slow ones: the median pair pays, the pairs together do not."""
    spec = _speculator()
    for _ in range(5):
        spec.observe_rate(8, 0.010, 8, "plain", outside=0.0)  # 800 tok/s
    for tokens, seconds in [(30, 0.020), (16, 0.060), (30, 0.020), (16, 0.060), (30, 0.020)]:
        spec.observe_rate(8, seconds / 2, 8, "sdsat", outside=0.0)  # the draft pass: one token each
        spec.observe_rate(8, seconds / 2, tokens - 8, "sdsat", outside=0.0)  # its verify pass
    # the slowest pair left out: 106 tokens in 0.12 s, 883 tok/s, where the median pair makes 1500
    assert spec.rates["8/greedy"]["sdsat"] == pytest.approx(106 / 0.12)
    spec.observe_rate(8, 0.020, 8, "sdsat", outside=0.0)
    spec.observe_rate(8, 0.040, 8, "sdsat", outside=0.0)  # 16 tokens in 60 ms again
    assert spec.rates["8/greedy"]["sdsat"] == pytest.approx(122 / 0.18)  # 678 tok/s against 800
    steps = [spec.sdsat_passes(_seqs(8)) for _ in range(EXPLORE_EVERY)]
    assert sum(bool(s) for s in steps) == EXPLORE_BURST_SDSAT  # measured to lose: explores only


def test_sdsat_measured_to_lose_decodes_plainly_but_for_bursts_of_a_pair():
    spec = _speculator()
    spec.observe_rate(1, 1.0, 100, "plain")
    spec.observe_rate(1, 1.0, 80, "sdsat")
    spec.observe_rate(1, 1.0, 80, "sdsat")  # 80 tokens/s against 100 (a loss this small: tries every EXPLORE_EVERY)
    steps = [spec.sdsat_passes(_seqs(1)) for _ in range(3 * EXPLORE_EVERY)]
    tries = [i for i, s in enumerate(steps) if s]
    assert len(tries) == 3 * EXPLORE_BURST_SDSAT
    assert all(tries[j + 1] == tries[j] + 1 for j in range(0, len(tries), 2))  # a draft pass, then its verify pass
    assert all(s == set() for s in steps if not s)


def test_gated_sdsat_drops_pending_drafts():
    spec = _speculator()
    spec.observe_rate(1, 1.0, 100, "plain")
    spec.observe_rate(1, 1.0, 10, "sdsat")
    spec.observe_rate(1, 1.0, 10, "sdsat")
    planned = _seqs(1, drafted=True)
    assert spec.sdsat_passes(planned) == set()
    assert planned[0][0].draft_tree is None  # dropped: the next pass, when SDSAT pays again, drafts afresh


def test_sdsat_that_pays_keeps_running_with_a_plain_step_now_and_then():
    spec = _speculator()
    spec.observe_rate(1, 1.0, 100, "plain")
    spec.observe_rate(1, 1.0, 150, "sdsat")
    spec.observe_rate(1, 1.0, 150, "sdsat")
    steps = [spec.sdsat_passes(_seqs(1)) for _ in range(2 * PLAIN_EVERY)]
    assert [i for i, s in enumerate(steps) if not s] == [PLAIN_EVERY - 1 + b for b in range(PLAIN_BURST)]
    assert all(s == {0} for s in steps if s)


def test_exploring_a_large_batch_takes_a_share_and_verifies_every_pending_draft():
    spec = _speculator()
    spec.observe_rate(32, 1.0, 3200, "plain")
    spec.observe_rate(32, 1.0, 2560, "sdsat")
    spec.observe_rate(32, 1.0, 2560, "sdsat")
    planned = _seqs(32)
    chosen = None
    for _ in range(EXPLORE_EVERY):
        chosen = chosen or spec.sdsat_passes(planned)
    assert EXPLORE_MIN_SEQS <= len(chosen) < 32
    for i in chosen:  # the share's draft passes drafted
        planned[i][0].draft_tree = _seqs(1, drafted=True)[0][0].draft_tree
    second = spec.sdsat_passes(planned)
    assert second == chosen  # the burst's second step: the same share verifies its drafts
    assert spec._step_scale == pytest.approx(32 / len(chosen))


def test_governed_sdsat_measured_to_lose_is_plain_decoding_and_lossless(llama_dir, monkeypatch):
    """With SDSAT's pairs measured far slower than plain steps, the engine decodes plainly but for exploring
    bursts; outputs stay those of plain decoding."""
    llm = LLM(str(llama_dir), kv_cache_bytes=2**24, block_size=4, space=SpacePolicy(k_max=3))
    monkeypatch.setattr(speculation, "MAX_LOSS_EXPLORE_EVERY", EXPLORE_EVERY)  # tries every EXPLORE_EVERY steps
    params = SamplingParams(max_new_tokens=3 * EXPLORE_EVERY)
    ref = [o.token_ids for o in llm.generate(PROMPTS[:1], params, speculate="none")]
    spec = llm.engine.speculator
    observe = spec.observe_rate

    def measured_to_lose(*args, **kwargs):  # whatever this machine measures, SDSAT stays measured to lose
        observe(*args, **kwargs)
        spec.rates["1/greedy"]["sdsat"] = 1e-6  # tokens per second: SDSAT loses against any plain step, so
        spec.rates["1/greedy"]["plain"] = 1e6  # (however much: the cap on the period is patched)

    monkeypatch.setattr(spec, "observe_rate", measured_to_lose)
    spec.rates["1/greedy"]["sdsat"], spec.rates["1/greedy"]["plain"] = 1e-6, 1e6
    shapes = []
    sdsat_plan = llm.engine.sdsat.plan

    def recording(planned, active=None, depth=None):
        out = sdsat_plan(planned, active, depth)
        shapes.extend((p.is_tree, p.num_rows - p.num_uncached) for _, p in out)
        return out

    monkeypatch.setattr(llm.engine.sdsat, "plan", recording)
    out = llm.generate(PROMPTS[:1], params, speculate="sdsat")
    assert [o.token_ids for o in out] == ref
    info = llm.engine.sdsat.info()
    assert 1 <= info["verify_passes"] <= 4  # explored (a burst every EXPLORE_EVERY steps), not run
    plain = [s for s in shapes if s[1] == 0]  # steps without a pass: plain plans, not trees of no nodes
    assert len(plain) >= len(shapes) - 8 and not any(is_tree for is_tree, _ in plain)


def _depth_case(step_ms, extend: float, batch: int = 1) -> int:
    """The chosen draft depth (of at most 5) for `batch` greedy SDSAT sequences, with t(rows) = step_ms(rows)
    and every depth's drafts extending the accepted path with probability `extend` (1,000 trials each)."""
    spec = Speculator(SpacePolicy(), 4, lambda seqs, rows, *group: step_ms(rows) / 1000, max_batch=64,
                      max_probe_rows=64)
    calibration = spec.calibrations["greedy"]
    for depth in range(1, 6):
        calibration.extend_trials["sdsat", depth] = 1000
        calibration.extend_hits["sdsat", depth] = 1000 * extend
    planned = [(SimpleNamespace(sdsat=True, params=SamplingParams()), SimpleNamespace(num_uncached=1, num_rows=1))
               for _ in range(batch)]
    return spec.sdsat_depth(planned, None, 5)


def test_sdsat_drafts_the_whole_chain_where_rows_are_free():
    assert _depth_case(lambda rows: 3.0, 0.5) == 5  # every draft is worth something and costs nothing
    assert _depth_case(lambda rows: 3.0, 0.5, batch=8) == 5


def test_sdsat_drafts_a_short_chain_where_each_row_costs_a_plain_step():
    """Each row as dear as a whole plain step, drafts accepted half the time: every depth past the first adds a
    row to both passes for a quarter token or less (whether even one pays is the gate's business). Rows at a
    fifth of a step and drafts accepted 9 times in 10: neither the shortest chain nor the longest."""
    assert _depth_case(lambda rows: 3.0 * rows, 0.5) == 1
    assert 1 < _depth_case(lambda rows: 3.0 + 0.6 * rows, 0.9) < 5


def test_a_pinned_curve_keeps_the_sdsat_depth():
    spec = _speculator(latency_curve={1: 0.01, 64: 0.64})
    planned = [(SimpleNamespace(sdsat=True, params=SamplingParams()), SimpleNamespace(num_uncached=1, num_rows=1))]
    assert spec.sdsat_depth(planned, None, 5) == 5
