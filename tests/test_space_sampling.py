"""Speculative sampling keeps the target distribution: exact goodness of fit and AR vs SPACE."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats

from tgi_space import sampling
from tgi_space.config import SpacePolicy
from tgi_space.llm import LLM
from tgi_space.sampling import SamplingParams, verify_sampled

V, K, LENGTH = 4, 3, 3


def markov_chain(seed: int):
    """A toy target: P[x] is the next-token distribution after token x; Q[j] a fixed draft per depth."""
    g = torch.Generator().manual_seed(seed)
    P = torch.rand(V, V, generator=g) ** 2 + 0.05
    Q = torch.rand(K, V, generator=g) ** 2 + 0.05
    return P / P.sum(-1, keepdim=True), Q / Q.sum(-1, keepdim=True)


def speculative_run(P, Q, g, verify=verify_sampled) -> tuple[int, ...]:
    """Generate LENGTH tokens after token 0 with draft-then-verify steps."""
    out = [0]
    while len(out) <= LENGTH:
        cands = torch.multinomial(Q, 1, generator=g).squeeze(-1).tolist()  # [K]
        rows = [out[-1]] + cands  # the target distribution at each chain row
        target_logits = P[rows].log()
        accepted, bonus = verify(target_logits, cands, Q, g)
        out += cands[:accepted] + [bonus]
    return tuple(out[1 : LENGTH + 1])


def exact_probs(P) -> dict[tuple[int, ...], float]:
    probs = {}
    for path in itertools.product(range(V), repeat=LENGTH):
        p, prev = 1.0, 0
        for x in path:
            p, prev = p * float(P[prev, x]), x
        probs[path] = p
    return probs


def goodness_of_fit(samples: list[tuple], probs: dict) -> float:
    counts = Counter(samples)
    keys = sorted(probs)
    observed = np.array([counts[k] for k in keys], dtype=float)
    expected = np.array([probs[k] for k in keys], dtype=np.float64)
    expected = expected / expected.sum() * len(samples)
    return stats.chisquare(observed, expected).pvalue


def resample_from_p(target_logits, candidates, draft_probs, generator):
    """The reference repositories' rule: on rejection, draw from p (not the residual). Biased."""
    p = target_logits.softmax(-1)
    for i, c in enumerate(candidates):
        if torch.rand(1, generator=generator).item() * draft_probs[i, c] >= p[i, c]:
            return i, sampling.sample(p[i], generator)
    return len(candidates), sampling.sample(p[-1], generator)


def test_speculative_sampling_matches_exact_distribution():
    P, Q = markov_chain(0)
    g = torch.Generator().manual_seed(123)
    samples = [speculative_run(P, Q, g) for _ in range(4000)]
    assert goodness_of_fit(samples, exact_probs(P)) > 1e-3


def test_the_test_catches_a_biased_rule():
    P, Q = markov_chain(0)
    g = torch.Generator().manual_seed(123)
    samples = [speculative_run(P, Q, g, resample_from_p) for _ in range(4000)]
    assert goodness_of_fit(samples, exact_probs(P)) < 1e-6


def test_equal_distributions_accept_everything():
    p = torch.tensor([[0.2, 0.3, 0.5]] * 3).log()
    q = p[:2].softmax(-1)
    g = torch.Generator().manual_seed(0)
    assert all(verify_sampled(p, [1, 2], q, g)[0] == 2 for _ in range(200))


def ar_vs_space_samples(llm, params: SamplingParams, n: int):
    prompt = [1, 7, 9, 11]
    outs = {}
    for mode, seed0 in (("none", 0), ("space", 10**6)):
        ps = [SamplingParams(**{**params.__dict__, "seed": seed0 + i}) for i in range(n)]
        outs[mode] = [tuple(o.token_ids[:3]) for o in llm.generate([prompt] * n, ps, speculate=mode)]
    return outs["none"], outs["space"]


def two_sample_pvalue(a: list[tuple], b: list[tuple]) -> float:
    ca, cb = Counter(a), Counter(b)
    keys = [k for k in set(ca) | set(cb) if ca[k] + cb[k] >= 10]
    rest = [sum(ca[k] for k in ca if k not in keys), sum(cb[k] for k in cb if k not in keys)]
    table = np.array([[ca[k] for k in keys] + [rest[0]], [cb[k] for k in keys] + [rest[1]]], dtype=float)
    table = table[:, table.sum(0) > 0]
    return stats.chi2_contingency(table).pvalue


@pytest.fixture(scope="module", params=[False, True], ids=["fixed-layout", "planned-trees"])
def sampling_llm(llama_dir, request):
    """The paper's layout (masks sampled from q, residual rule) and the planned trees (draw-then-match);
    the planned step gets a flat latency curve so that it really sends trees and groups."""
    flat = {1: 0.01, 10**6: 0.01}
    return LLM(str(llama_dir), kv_cache_bytes=2**26, max_num_seqs=2048,
               space=SpacePolicy(k_max=3, max_step_query_tokens=10**6, planner=request.param, latency_curve=flat))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=4, do_sample=True, temperature=0.7, top_k=4),
        SamplingParams(max_new_tokens=4, do_sample=True, top_p=0.6, repetition_penalty=1.5),
        SamplingParams(max_new_tokens=4, do_sample=True, temperature=0.5, typical_p=0.8),
    ],
    ids=["top_k", "top_p+penalty", "typical_p"],
)
def test_space_sampling_matches_ar_on_the_model(sampling_llm, params):
    ar, space = ar_vs_space_samples(sampling_llm, params, 1500)
    assert len(set(ar)) > 3  # a real distribution, not a point mass
    assert two_sample_pvalue(ar, space) > 1e-3


@pytest.mark.parametrize("warpers", [{"temperature": 1.3}, {"temperature": 0.9, "top_p": 0.8, "top_k": 50}])
def test_seeded_requests_are_reproducible(sampling_llm, warpers):
    """Alone or beside others with the same settings (their rows then warped in one call, `_warp_together`)."""
    params = SamplingParams(max_new_tokens=12, do_sample=True, seed=42, **warpers)
    for mode in ("none", "space"):
        a = sampling_llm.generate([[1, 5, 6]] * 3, params, speculate=mode)
        b = sampling_llm.generate([[1, 5, 6]], params, speculate=mode)
        assert a[0].token_ids == a[1].token_ids == a[2].token_ids == b[0].token_ids


@pytest.mark.parametrize("warpers", [{"top_p": 0.9}, {"temperature": 0.7, "top_k": 40, "top_p": 0.95},
                                     {"temperature": 1.2, "typical_p": 0.9}])
def test_warping_rows_together_gives_each_row_the_bits_it_gets_alone(warpers):
    """The engine warps the rows of sequences with equal settings in one call: each row must come out exactly as
    when warped alone, so a seeded request's tokens do not depend on its neighbours."""
    g = torch.Generator().manual_seed(11)
    rows = torch.randn(37, 8192, generator=g) * 4
    params = SamplingParams(do_sample=True, **warpers)
    together = sampling.apply_warpers(rows, params)
    alone = torch.cat([sampling.apply_warpers(rows[r : r + 1], params) for r in range(len(rows))])
    assert torch.equal(together, alone)


def test_sample_draws_each_token_at_its_weight_and_never_a_zero_weight_one():
    """`sample` (inverse of the cumulative weights at one uniform point): chi-square against the weights,
    with zero-weight tokens between and at the ends; the negative control (the same draws judged against
    weights shifted by 0.03) must fail, so the test can."""
    weights = torch.tensor([0.0, 0.30, 0.0, 0.05, 0.25, 0.40, 0.0])  # unnormalised is allowed: scaled below
    g = torch.Generator().manual_seed(7)
    draws = Counter(sampling.sample(weights * 3.0, g) for _ in range(20000))
    assert set(draws) == {1, 3, 4, 5}
    keys = [1, 3, 4, 5]
    observed = [draws[k] for k in keys]
    assert stats.chisquare(observed, [20000 * w for w in (0.30, 0.05, 0.25, 0.40)]).pvalue > 1e-3
    shifted = [0.33, 0.05, 0.22, 0.40]
    assert stats.chisquare(observed, [20000 * w for w in shifted]).pvalue < 1e-6
    many = Counter(sampling.sample_many(weights, 20000, g))  # one call, i.i.d. draws
    assert set(many) == {1, 3, 4, 5}
    assert stats.chisquare([many[k] for k in keys], [20000 * w for w in (0.30, 0.05, 0.25, 0.40)]).pvalue > 1e-3
    assert stats.chisquare([many[k] for k in keys], [20000 * w for w in shifted]).pvalue < 1e-6
    with pytest.raises(ValueError, match="weights sum to"):
        sampling.sample(torch.zeros(5), g)
    with pytest.raises(ValueError, match="weights sum to"):
        sampling.sample(torch.tensor([0.5, float("nan")]), g)


def test_top_p_keeps_what_transformers_top_p_warper_keeps():
    """The nucleus against transformers' TopPLogitsWarper (an independent implementation of the same rule),
    at several temperatures of 8,192-token rows: the kept sets agree but for tokens whose mass ranked above
    is within float32 rounding (2e-6) of top_p."""
    from transformers import TopPLogitsWarper  # noqa: PLC0415

    g = torch.Generator().manual_seed(3)
    for scale, top_p in ((0.5, 0.95), (2.0, 0.9), (6.0, 0.5), (6.0, 0.999), (20.0, 0.8)):
        logits = torch.randn(16, 8192, generator=g) * scale
        ours = sampling.apply_warpers(logits, SamplingParams(do_sample=True, top_p=top_p)) > float("-inf")
        theirs = TopPLogitsWarper(top_p)(None, logits.clone()) > float("-inf")
        for row, token in (ours != theirs).nonzero().tolist():
            p = logits[row].double().softmax(-1)
            assert abs(float(p[p > p[token]].sum()) - top_p) < 2e-6, (scale, top_p, row, token)
        assert (ours != theirs).sum() <= 3
        assert ours.sum(-1).min() >= 1  # the most likely token is always kept
