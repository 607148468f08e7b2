"""The planned speculative step: drafters propose trees, the planner picks rows, verification walks trees.

Per step, for every speculating sequence: its draft tree (mask and suffix drafts
merged, scored by calibrated survival) and an optional mask group become a
`Proposal`; `planner.plan` chooses what is worth its rows given the measured t(N);
the chosen nodes become the plan's candidate tree (K/V in scratch slots) and the
chosen anchors its mask groups. After the forward, `verify` walks the tree (greedy
or draw-then-match sampling), and `draft_next` builds the next tree.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict, deque
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from tgi_space.config import SpacePolicy
from tgi_space.drafters import (SUFFIX_MATCHES, Calibration, SharedSuffixCache, SuffixIndex, SurvivalCalibration,
                                mask_tree, mask_tree_of, merge, trie_tree)
from tgi_space.logit_stats import MAX_TOP, LogitStats, reads_stats
from tgi_space.planner import LatencyCurve, LatencySurface, Proposal, RealisedShare, RobustRatio, plan
from tgi_space.sampling import process
from tgi_space.sdsat import SOURCE as SDSAT_SOURCE
from tgi_space.sequence import Sequence
from tgi_space.space import SeqPlan
from tgi_space.tree import ROOT, DraftTree, verify_tree_greedy, verify_tree_rejection, verify_tree_sampled

EXTRA_ROWS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)  # probed rows beyond one per sequence
PROBE_BATCHES = (1, 4, 16, 64)  # batch sizes the latency surface is measured at


@dataclass
class SpeculationStats:
    """Engine-wide figures of the planned step, for metrics and /info."""

    steps: int = 0
    plain_steps: int = 0  # steps where no sequence sent a candidate or a mask (plain-decoding fallback)
    rows: int = 0  # query rows sent, all steps
    predicted_tokens: float = 0.0  # sum over steps of num_sequences + chosen node scores
    realised_tokens: int = 0  # tokens verification emitted (before stop truncation)
    accepted_by_drafter: dict[str, int] = field(default_factory=dict)
    drafted_by_drafter: dict[str, int] = field(default_factory=dict)


class Speculator:
    """Holds the calibration, the latency curve and the mask gain; plans, verifies and drafts."""

    def __init__(
        self, policy: SpacePolicy, mask_group_size: int, measure: Callable[[int, int], float], max_batch: int,
        max_probe_rows: int,
        datastore: SuffixIndex | None = None,
    ) -> None:
        self.policy = policy
        self.max_batch = max_batch  # the largest batch the surface is probed at
        self.max_probe_rows = max_probe_rows  # rows per sequence the probes stay within
        self.group_size = mask_group_size if "masks" in policy.drafters else 0
        self.measure = measure  # (num_seqs, rows[, group]) -> seconds of one forward (measured once, on first use)
        # Seconds a step pays for carrying any mask group beyond what as many plain rows cost: a gated
        # adapter's deltas (docs/adapters.md) are a fixed set of extra GEMMs per step. Probed with t(N).
        self.mask_step_cost = 0.0
        pinned = policy.latency_curve
        self.curve: LatencySurface | None = LatencySurface({1: LatencyCurve(pinned)}) if pinned else None
        # Per sampling regime of the sequence (`seq_regime`: greedy, sampled, hot): sampling accepts fewer
        # drafts than greedy decoding, and a server mixing both must not price greedy drafts at sampled odds.
        self.calibrations: dict[str, Calibration] = defaultdict(Calibration)
        # sent nodes' worth, per (regime, drafter): a datastore node of a score is reached less often than a
        # suffix node of the same score (benchmarks/survival_trace.py: 0.03 against 0.48, 8 or more deep)
        self.survival: dict[tuple[str, str], SurvivalCalibration] = defaultdict(SurvivalCalibration)
        shared = policy.suffix_shared_tokens if "suffix" in policy.drafters else 0
        self.shared = SharedSuffixCache(policy.suffix_max_match, shared) if shared else None
        # The self-drafted datastore (datastore.py), read-only: looked up like the shared cache.
        self.datastore = datastore if "suffix" in policy.drafters else None
        self.mask_gain = 1.0  # running mean of tokens the mask drafts got accepted per step (reported)
        self._step_mask_values: dict[str, tuple[float, ...]] = {}  # this step's mask_values(), by regime
        # The share of their predicted value that mask drafts really added next to a suffix match: accepted
        # tokens past the deepest the suffix drafts of the same step covered (masks are worth only what those
        # miss), by regime. Learnt and applied only where the sequence's suffix drafter had a match when its
        # groups were planned: without one the masks' own calibration prices them, and a share learnt there
        # fed on itself (fewer nodes sent, fewer accepted, a lower share; masks-only fell to 0.95x plain).
        self.mask_worth: dict[str, RealisedShare] = defaultdict(RealisedShare)
        # Running means, apart for greedy steps and steps with sampled sequences (sampling accepts fewer
        # drafts and costs more per node): accepted nodes per node sent; seconds of drafting, planning and
        # tree walking per speculating sequence.
        self.value_per_row: dict[bool, float] = {False: 0.5, True: 0.5}
        self.overhead_per_seq: dict[bool, float] = {False: 0.0, True: 0.0}
        self._cannot_pay: dict[bool, int] = defaultdict(int)  # steps kept plain as rows could not pay, by regime
        # What steps really cost against the probed surface, learnt from every step (wall time of the
        # whole step, logits, verification and Python included): plain steps scale t(B, B); extra rows
        # cost marginal_factor times what the surface says they add.
        # Kept per batch-size bucket (PROBE_BATCHES), since what a row costs depends on the batch, and apart
        # for greedy steps and steps with sampled sequences (`_factor_key`): a sampled step's filtering and
        # draws cost more per sequence, and learnt together they made plain rows look dear and extra rows
        # cheap for greedy requests (the batch-1 bench's hybrid engine, which also serves its T = 0.2 and 1.0
        # runs: plain factor 1.47 against 1.23 in a greedy-only engine, 16.2 rows per greedy step; 14.0 with
        # the greedy steps' own factors, for more tokens per step).
        # A pinned curve (policy.latency_curve) is taken as the truth: no factors, no learnt overhead,
        # so the planner's choices do not depend on timing (reproducible runs, snapshot tests).
        self.adaptive = policy.latency_curve is None
        # Realised tokens per second of speculative and of plain steps, per batch size: when
        # speculation is measured to lose, steps stay plain (but for one probe every EXPLORE_EVERY).
        # Kept apart for all-greedy steps and steps with sampled sequences ("1/greedy", "16/sampled", ...):
        # drafts are accepted far less often when sampling hot, and that must not stop greedy speculation.
        # Only rates of one batch size are compared (`_comparison`): a step's wall time holds per-sequence
        # work the probed surface does not, so rates of other sizes cannot be rescaled to it (scaled by the
        # surface, batch 8's speculative rate looked 1.9x at batch 16 against 1.4x measured for plain steps,
        # and speculation ran at 0.64-0.78x plain through the shard at 16 in flight).
        # A rate is the median of the kind's last RATE_WINDOW steps: on two shared cores a step now and then
        # takes 10-50 ms longer (another process runs), and plain steps are measured rarely while speculation
        # pays, so one slow plain step in a running mean kept speculation on where it lost.
        self.rates: dict[str, dict[str, float]] = defaultdict(dict)
        self._recent: dict[str, dict[str, deque]] = defaultdict(dict)
        self._spec_steps: dict[tuple[str, str], deque] = defaultdict(lambda: deque(maxlen=SPEC_WINDOW))  # `_observe_summed`
        self._gated: dict[str, int] = defaultdict(int)
        self._since_plain: dict[str, int] = defaultdict(int)  # speculative steps since the key's last plain one
        self._explore_period: dict[str, int] = {}  # a key's exploring period while it keeps losing (>= EXPLORE_EVERY)
        self._exploring: dict[str, bool] = defaultdict(bool)  # this step speculates only to re-measure
        self._masks_gated: dict[str, int] = defaultdict(int)
        # The last rated step's key, tokens and seconds, while it waits to be judged with the next one (of the
        # same key: a batch that changed size in between breaks the pair): a groups-only step, an SDSAT draft pass.
        self._mask_lead: tuple[str, float, float] | None = None
        self._sdsat_half: tuple[str, float, float] | None = None
        self._last_kind: str | None = None  # the kind of the last step rated or passed over (`observe_rate`)
        self._sdsat_round = 0  # turns over between SDSAT exploring bursts (which share of a batch tries)
        self.mask_factor = 1.0  # measured / probed cost of a step's mask groups, learnt from masked steps
        keys = [(b, sampled) for b in PROBE_BATCHES for sampled in (False, True)]
        self.plain_factor = {k: 1.3 if self.adaptive else 1.0 for k in keys}
        self.marginal_factor = {k: 2.0 if self.adaptive else 1.0 for k in keys}
        # ... as weighted medians of recent steps (RobustRatio): a stalled step must not price rows out.
        self._plain_ratio = {k: RobustRatio(f, 0.5, 4.0) for k, f in self.plain_factor.items()}
        self._marginal_ratio = {k: RobustRatio(f, 0.5, 6.0) for k, f in self.marginal_factor.items()}
        self._mask_ratio = RobustRatio(self.mask_factor, 0.5, 4.0)
        self._busy = 0.0  # this step's drafting / verification seconds so far
        self._step_busy = 0.0  # the last finished step's (end_step), taken out of its time when rows are priced
        # Exploring steps of a large batch draft for a share of the sequences only (explore_share): which
        # share turns over between bursts; _step_scale (all speculating / drafting, this step) scales that
        # step's extra tokens and seconds up to the whole batch when its rate is recorded.
        # _in_burst: this step explores (before `_speculating` runs: the last step did).
        self._explore_round, self._in_burst, self._step_scale = 0, False, 1.0
        # Seconds a serving cycle spends outside the engine per step (the shard's gRPC answer, the router's
        # work before the next Decode), per batch bucket: measured between the end of one step and the start
        # of the next, so a step is judged by the wall time of the whole cycle. About 0 in `LLM.generate`.
        self.outside: dict[int, float] = {b: 0.0 for b in PROBE_BATCHES}
        self._step_end: float | None = None
        self.step_start: float | None = None  # set by plan(), read once by the engine's execute
        self._pending_rate: tuple | None = None  # the last step's observe_rate arguments, until its gap is known
        self.stats = SpeculationStats()

    # ---- planning ------------------------------------------------------------------------

    def latency(self) -> LatencySurface:
        """The measured t(rows, batch), taken on first use (a few forwards per point, medians)."""
        if self.curve is None:
            curves = {}
            for b in [b for b in PROBE_BATCHES if b <= self.max_batch] or [1]:
                rows = [b + extra for extra in EXTRA_ROWS if (b + extra) <= b * self.max_probe_rows]
                rows = rows or [b]
                curves[b] = LatencyCurve({r: self.measure(b, r) for r in rows})
            self.curve = LatencySurface(curves)
            g = self.group_size
            if g and 1 + g <= self.max_probe_rows:  # the least of 3 alternating differences: robust to a busy CPU
                diffs = [self.measure(1, 1 + g, g) - self.measure(1, 1 + g) for _ in range(3)]
                self.mask_step_cost = max(0.0, min(diffs))
        return self.curve

    def plan(self, planned: list[tuple[Sequence, SeqPlan]]) -> list[tuple[Sequence, SeqPlan]]:
        """Give each speculating sequence the tree nodes and mask groups worth their rows."""
        self.step_start = time.perf_counter()  # the step's wall time counts its planning too (`take_step_start`)
        self._observe_gap(len(planned))
        spec = [i for i, (seq, _) in enumerate(planned) if seq.speculate and not seq.sdsat]  # SDSAT: sdsat.py
        sampled = any_sampled(planned)
        key = _rate_key(len(planned), sampling_regime(planned))
        chosen = self._speculating(planned, spec, key, sampled)
        for i in set(spec) - set(chosen):  # the next tree is drafted when speculation pays again
            planned[i][0].draft_tree = planned[i][0].mask_expect = None
        spec = chosen
        if not spec:
            return planned  # plain decoding, without even drafting
        start = time.perf_counter()
        self._step_mask_values = {}
        proposals = [self._proposal(*planned[i]) for i in spec]
        if not self._sends_masks(key):
            proposals = [dataclasses.replace(p, group_size=0) for p in proposals]
        choices = self._choose(planned, spec, proposals, sampled, self.mask_factor * self.mask_step_cost)
        self._busy += time.perf_counter() - start
        out = list(planned)
        for i, proposal, choice in zip(spec, proposals, choices):
            seq, base = planned[i]
            out[i] = (seq, _tree_plan(base, proposal, choice))
        self._record_plan(out, proposals, choices)
        return out

    def _row_budget(self, base_rows: int) -> int:
        """Rows this step may send: max_step_query_tokens, or for an exploring share, which stands for the whole
        batch (`_step_scale`), its share of the extra rows: everybody drafting would share them. With the whole
        budget, a quarter of 64 sequences drafted 4 nodes each where all 64 would get 1, and its tokens scaled
        to the batch promised what full-batch speculation never gave (equal lengths through the shard with the
        datastore's drafts: c = 64 at 0.81x plain)."""
        budget = self.policy.max_step_query_tokens
        return base_rows + int(max(0, budget - base_rows) / self._step_scale)

    def _speculating(self, planned: list[tuple[Sequence, SeqPlan]], spec: list[int], key: str, sampled: bool) -> list[int]:
        """Which of the speculating sequences draft this step: all when speculation is judged to pay;
        when a gate opens only to explore, a share of them (`explore_share`), so that re-measuring
        costs a bounded part of a large batch; none otherwise."""
        chosen, exploring = self._speculating_all(planned, spec, key, sampled)
        self._explore_round += self._in_burst and not exploring  # a burst ended: the next takes a new share
        self._in_burst, self._step_scale = exploring, 1.0
        if not chosen or not exploring:
            return chosen
        share = explore_share(spec, [planned[i][0].seq_id for i in spec], self._explore_round)
        self._step_scale = len(spec) / len(share)
        return share

    def _speculating_all(self, planned: list[tuple[Sequence, SeqPlan]], spec: list[int], key: str,
                         sampled: bool) -> tuple[list[int], bool]:
        """(spec or [], whether that is only to explore), by the measured rates and the rows' worth."""
        if not spec or not self._measured_to_pay(key):
            return [], False
        if self._rows_could_pay(planned, len(spec), sampled):
            return spec, self._exploring[key]
        # Rows worth what sent nodes have been worth lately would not pay: EXPLORE_BURST steps in
        # EXPLORE_EVERY draft anyway (else a bad patch would stop speculation for good: nothing sent,
        # nothing to show that drafts pay again).
        if self.adaptive and _explore(self._cannot_pay, sampled, EXPLORE_EVERY, EXPLORE_BURST):
            return spec, True
        return [], False

    def sdsat_passes(self, planned: list[tuple[Sequence, SeqPlan]]) -> set[int] | None:
        """Which SDSAT sequences run their pass this step (sdsat.py); the others decode plainly and their
        pending drafts are dropped (lossless: a draft pass emitted its exact token already). None: all of them
        (a pinned curve: not governed). Governed like SPACE's step, by SDSAT_GATE: all while SDSAT's pairs of
        passes are not measured slower than plain steps; while they are, a share explores in bursts."""
        sd = [i for i, (seq, _) in enumerate(planned) if seq.sdsat]
        if not sd or not self.adaptive:
            return None
        key = _rate_key(len(planned), sampling_regime(planned))
        if not self._measured_to_pay(key, SDSAT_GATE):
            for i in sd:
                planned[i][0].draft_tree = None
            self._sdsat_round += 1
            return set()
        if not self._exploring[SDSAT_GATE.prefix + key]:
            return set(sd)
        share = explore_share(sd, [planned[i][0].seq_id for i in sd], self._sdsat_round)
        active = set(share) | {i for i in sd if planned[i][0].draft_tree is not None}  # drafted: verified
        for i in set(sd) - active:
            planned[i][0].draft_tree = None
        self._step_scale = len(sd) / len(active)
        return active

    def sdsat_depth(self, planned: list[tuple[Sequence, SeqPlan]], active: set[int] | None, max_depth: int) -> int:
        """Adaptive tokens per greedy draft pass this step: the g in 1..max_depth that maximises the tokens per
        second of a pair of passes, (2B + n R(g)) / t(base + n g), where B sequences emit one token each per
        step, n run SDSAT passes, R(g) is the expected accepted drafts of a chain of g (the calibrated chance of
        each depth extending the path, multiplied along it; unmeasured depths at their prior, so they get tried)
        and t is the step's predicted cost with n g more rows (a draft pass sends g adaptive tokens, the verify
        pass g drafts). Where rows are dear (an AVX2 CPU: t(6) ~1.6x t(1)) short chains pay and long ones lose;
        where they are nearly free (AMX) it stays max_depth. max_depth with a pinned curve (reproducible)."""
        sd = [i for i, (seq, _) in enumerate(planned) if seq.sdsat and (active is None or i in active)]
        if not self.adaptive or not sd or max_depth <= 1:
            return max_depth
        base = sum(p.num_uncached if seq.sdsat else p.num_rows for seq, p in planned)
        cost = self._cost_of_rows(base, len(planned), sampled=any_sampled(planned))
        gained, best = 0.0, (0.0, max_depth)
        for g, reach in enumerate(self.sdsat_reach(max_depth), start=1):
            gained += reach
            rate = (2 * len(planned) + len(sd) * gained) / cost(base + len(sd) * g)
            best = max(best, (rate, -g))
        return -best[1]

    def sdsat_reach(self, g: int) -> list[float]:
        """The calibrated chance that a greedy verify pass reaches each depth 1..g of an adaptive chain (what
        the planner values its nodes at, beside suffix drafts)."""
        calibration, reach, out = self.calibrations["greedy"], 1.0, []
        for d in range(1, g + 1):
            reach *= calibration.extension(SDSAT_SOURCE, d, SDSAT_EXTEND_PRIOR)
            out.append(reach)
        return out

    def suffix_drafts(self, seq: Sequence) -> DraftTree:
        """seq's suffix drafts after its last token (empty without the suffix drafter), for SDSAT's verify pass."""
        return self._suffix(seq)

    def sdsat_trees(self, planned: list[tuple[Sequence, SeqPlan]], active: set[int] | None) -> None:
        """Greedy SDSAT verify passes whose trees hold suffix drafts beside the adaptive chain keep the nodes
        worth their rows, chosen together over the batch as the planner chooses SPACE's (`plan`: by value, the
        chain at its calibrated reach, best prefix of (tokens / t(rows))). Pure adaptive chains are left as
        `sdsat_depth` sized them."""
        idx = [i for i, (seq, _) in enumerate(planned)
               if seq.sdsat and seq.draft_tree and seq.params.is_greedy and (active is None or i in active)
               and any(source != SDSAT_SOURCE for source in seq.draft_tree.sources)]
        if not idx:
            return
        start = time.perf_counter()
        depth = self.policy.max_tree_depth
        proposals = [Proposal(planned[i][1].num_uncached, self._capped(planned[i][0].draft_tree, depth), 0, 0.0)
                     for i in idx]
        choices = self._choose(planned, idx, proposals, any_sampled(planned))
        for i, proposal, choice in zip(idx, proposals, choices):
            planned[i][0].draft_tree = proposal.tree.subtree(choice.nodes)
        self._busy += time.perf_counter() - start

    def _measured_to_pay(self, key: str, gate: Gate | None = None) -> bool:
        """False while speculative steps (gate.kinds) of this batch size have been measured slower (tokens
        per second, whole step) than plain ones (by `gate_margin`); gate.burst steps in a period
        speculate anyway, to re-measure (those steps are `_exploring`). The period is EXPLORE_EVERY
        and, in batches of more than one sequence, doubles (up to MAX_EXPLORE_EVERY) after each one
        that ends still measured to lose: there re-measuring costs a share of the batch every time.
        While speculation is judged to pay, PLAIN_BURST steps in about PLAIN_EVERY stay plain (`_plain_due`).
        The gate's counters are its own (gate.prefix + key); the rates are the key's. The exploring period
        and its count are shared by a size class (`_size_class`): under steady load the batch size wanders
        over a few neighbouring sizes, and a period of its own for each would explore that many times as often."""
        gate = gate or SPACE_GATE
        counter, period_key = gate.prefix + key, gate.prefix + _size_class(key)
        self._exploring[counter] = False
        if not self.adaptive:
            return True
        spec, plain = self._comparison(key, gate.kinds)
        if spec is None or plain is None or spec >= gate_margin(key) * plain:
            if self._explore_period.pop(period_key, None) is not None or self._gated[period_key] < 0:
                self._gated[period_key] = 0  # the next losing stretch starts a fresh period
            return spec is None or not self._plain_due(counter, missing="plain" not in self.rates[key])
        period = max(self._explore_period.get(period_key, EXPLORE_EVERY), _loss_period(plain / spec, gate.burst))
        self._exploring[counter] = _explore(self._gated, period_key, period, gate.burst)
        if self._exploring[counter] and self._gated[period_key] == 0 and _batch_of(key) > 1:  # a burst's last step
            self._explore_period[period_key] = min(MAX_EXPLORE_EVERY, 2 * period)
        return self._exploring[counter]

    def _plain_due(self, key: str, missing: bool) -> bool:
        """Whether this step, which would speculate, stays plain to re-measure plain decoding: PLAIN_BURST
        consecutive steps after every PLAIN_EVERY - 1 while speculation is judged to pay (PLAIN_MISSING_EVERY
        while plain has never been measured at this key). Without them the comparison goes stale: a batch size
        that started out speculating would keep speculating on a plain rate measured under other conditions,
        or on none. A burst, because the first plain step after speculative ones is not rated (`observe_rate`):
        through the shard at 16 sequences such steps took 7-10 ms where plain steps in a row took 5.5, and
        three of them made the plain rate half of what it was, so speculation ran at 0.85x judged to pay 2x."""
        self._since_plain[key] += 1
        period = PLAIN_MISSING_EVERY if missing else PLAIN_EVERY
        if self._since_plain[key] < period:
            return False
        if self._since_plain[key] >= period + PLAIN_BURST - 1:
            self._since_plain[key] = 0
        return True

    def _sends_masks(self, key: str) -> bool:
        """Whether this step may send mask groups. An exploring burst re-measures trees alone and trees with
        groups in turn (bursts alternate), so that neither kind's rate goes stale; with no drafter but the
        masks every burst sends groups (there are no trees without them)."""
        if self._in_burst:
            return "suffix" not in self.policy.drafters or self._explore_round % 2 == 1
        return self._masks_measured_to_pay(key)

    def _masks_measured_to_pay(self, key: str) -> bool:
        """False while steps carrying mask groups have been measured slower (tokens per second, whole
        step) than plain steps; EXPLORE_BURST steps in MASKS_EXPLORE_EVERY send groups anyway. Judged apart from the
        trees, so costly masks (a gated adapter) do not stop suffix drafts. (Not against steps with
        trees only: those are the steps after a good draft, and masks are what drafts them.)"""
        if not self.adaptive:
            return True
        masks, plain = self._comparison(key, ("masks",))
        if masks is None or plain is None or masks >= gate_margin(key) * plain:
            return True
        return _explore(self._masks_gated, _size_class(key), MASKS_EXPLORE_EVERY, EXPLORE_BURST)

    def observe_rate(self, num_seqs: int, seconds: float, tokens: int, kind: str, sampled: str | bool = False,
                     outside: float | None = None, floor: float = 0.0) -> None:
        """One step's realised tokens per second (wall time of the whole step), by kind ("plain": no
        candidate and no group, "tree": candidates only, "masks": with mask groups; "lead": mask groups and
        no candidates, rated as "masks" together with the next step, which verifies their drafts), batch size, and
        `sampling_regime` (a bool: sampled or greedy). `outside`: the step's own time outside the engine (else
        the running mean of the batch size's). `floor`: the predicted cost of the step's speculative rows (`rows_cost`),
        the least extra time an exploring share's step is taken to have cost."""
        key = _rate_key(num_seqs, sampled)
        rates = self.rates[key]
        total = seconds + (self.outside[_bucket(num_seqs)] if outside is None else outside)
        if kind != "plain" and self._step_scale > 1 and "plain" in rates:  # an exploring share: what
            plain = num_seqs / rates["plain"]  # speculating everybody would give, from its extra tokens and time.
            # Its extra time over plain steps' median is a difference of noisy times, multiplied by the scale: a step
            # that ran faster than that median made it negative (measured through the shard at 64 sequences: a
            # share's step rated at 74,000 and -133,000 tok/s against plain's 2,000, which opened the gate to
            # full-batch speculation: such runs served 0.81-0.88x plain). It is never taken for less than its rows
            # are predicted to cost.
            tokens = num_seqs + (tokens - num_seqs) * self._step_scale
            total = plain + max(total - plain, floor) * self._step_scale
        lead, self._mask_lead = self._mask_lead, None
        if kind == "lead":  # it sent mask groups and had no drafts: judged with the step that verifies theirs
            self._mask_lead = (key, tokens, total)
            return
        if lead is not None and lead[0] == key:  # (whatever that step is: verifying nothing, the groups were wasted)
            tokens, total, kind = tokens + lead[1], total + lead[2], "masks"
        after, self._last_kind = self._last_kind, kind
        if kind == "plain" and after not in (None, "plain"):  # the first plain step after speculative ones is
            self._sdsat_half = None  # not what plain decoding costs: not rated (plain re-measures: PLAIN_BURST)
            return
        if kind == "sdsat":
            paired = self._pair(key, tokens, total)
            if paired is not None:
                self._observe_summed(key, "sdsat", *paired)
            return
        self._sdsat_half = None  # a pair is two consecutive SDSAT steps
        if kind in SPACE_KINDS:
            self._observe_summed(key, "spec", tokens, total)
        rate = tokens / max(total, 1e-9)
        recent = self._recent[key].get(kind)
        if recent is None or kind not in rates:  # nothing yet or forgotten: a fresh window (from a rate set as is)
            recent = self._recent[key][kind] = deque([rates[kind]] if kind in rates else [], maxlen=RATE_WINDOW)
        recent.append(rate)
        rates[kind] = statistics.median(recent)

    def _observe_summed(self, key: str, name: str, tokens: float, total: float) -> None:
        """A rate of speculative steps, "spec" (the planned step's, every kind together) or "sdsat" (pairs of
        SDSAT steps): tokens over seconds of the key's last SPEC_WINDOW, the slowest left out once there are
        four. Not the median of each step's rate: speculative steps are unlike each other (tree steps verify
        what masked steps paid for: 1.5x plain at 8 sequences while masked steps ran at 0.85x, 0.9x together;
        SDSAT pairs' median said 1.36x plain where their tokens over their seconds said 1.07x), and a
        throughput is a ratio of sums. Plain steps are alike: theirs stays the median (RATE_WINDOW)."""
        window = self._spec_steps[key, name]
        window.append((tokens, total))
        kept = sorted(window, key=lambda s: s[0] / max(s[1], 1e-9))[1 if len(window) >= 4 else 0 :]
        self.rates[key][name] = sum(t for t, _ in kept) / max(sum(s for _, s in kept), 1e-9)

    def _comparison(self, key: str, kinds: tuple[str, ...]) -> tuple[float | None, float | None]:
        """(the best of `kinds`' rates, the plain rate), both measured at one batch size: the key's when it has
        both, else those of the nearest size within a factor NEAR_SIZES (same regime) that has both, else what
        the key has. A ratio carries over between nearby batch sizes far better than a rate does."""
        def pair(rates: dict[str, float]) -> tuple[float | None, float | None]:
            return max((rates[k] for k in kinds if k in rates), default=None), rates.get("plain")

        own = pair(self.rates[key])
        if None not in own:
            return own
        size, regime = _batch_of(key), key.rsplit("/", 1)[1]
        near = sorted((abs(math.log(_batch_of(k) / size)), _batch_of(k), k) for k in list(self.rates)
                      if k.rsplit("/", 1)[1] == regime and k != key
                      and NEAR_SIZES * size >= _batch_of(k) >= size / NEAR_SIZES)
        for *_, k in near:
            other = pair(self.rates[k])
            if None not in other:
                return other
        return own

    def _pair(self, key: str, tokens: float, total: float) -> tuple[float, float] | None:
        """SDSAT steps are judged two at a time (a draft pass, then the verify pass of its drafts: alone, the
        first would look slow and the second fast): None for the first, then the pair's tokens and seconds."""
        half, self._sdsat_half = self._sdsat_half, None
        if half is None or half[0] != key:
            self._sdsat_half = (key, tokens, total)
            return None
        return half[1] + tokens, half[2] + total

    def _rows_could_pay(self, planned: list[tuple[Sequence, SeqPlan]], num_spec: int, sampled: bool) -> bool:
        num_seqs = len(planned)
        rows = num_seqs  # judged in the decode regime (one row each): drafts made while prefilling
        outside = self.outside[_bucket(num_seqs)]  # pay only if the decode steps after speculate too:
        plain = num_seqs / (self.step_cost(rows, rows, num_seqs, sampled) + outside)
        overhead = self.overhead_per_seq[sampled] * num_spec + outside
        v = max(self.value_per_row[sampled], 0.05)
        sizes = [k * m for k in (1, 2, 4, 8, self.policy.max_tree_depth) for m in (1, num_spec)]
        cost = self._cost_of_rows(rows, num_seqs, sampled=sampled)
        return any((num_seqs + v * k) / (cost(rows + k) + overhead) > plain for k in sizes)

    def step_cost(self, base_rows: int, rows: int, num_seqs: int, sampled: bool = False) -> float:
        """Predicted seconds of a step of `rows` rows whose sequences alone need `base_rows` (corrected online;
        `sampled`: the step has sampled sequences)."""
        return self._cost_of_rows(base_rows, num_seqs, sampled=sampled)(rows, num_seqs)

    def _cost_of_rows(self, base_rows: int, num_seqs: int, fixed: float = 0.0,
                      sampled: bool = False) -> Callable[[int, int], float]:
        """step_cost(base_rows, rows, num_seqs, sampled) + fixed as a function of rows (the batch size is
        num_seqs), remembered per row count: the planner asks for the same counts many times."""
        surface, b = self.latency(), _factor_key(num_seqs, sampled)
        plain = surface(base_rows, num_seqs)
        known: dict[int, float] = {}

        def cost(rows: int, _num_seqs: int = num_seqs) -> float:
            if rows not in known:
                extra = surface(rows, num_seqs) - plain
                known[rows] = self.plain_factor[b] * plain + self.marginal_factor[b] * extra + fixed
            return known[rows]

        return cost

    def observe_step(self, base_rows: int, rows: int, num_seqs: int, seconds: float, masks: bool = False,
                     sampled: bool = False) -> None:
        """Learn the correction factors from one step's wall time (not with a pinned curve); `masks`:
        the step carried mask groups (their probed fixed cost is learnt apart from the rows'); `sampled`: it
        had sampled sequences (their factors are their own)."""
        if not self.adaptive:
            return
        surface, b = self.latency(), _factor_key(num_seqs, sampled)
        plain = surface(base_rows, num_seqs)
        if rows == base_rows:
            self.plain_factor[b] = self._plain_ratio[b].observe(seconds, plain)
            return
        extra = surface(rows, num_seqs) - plain
        seconds -= self._step_busy  # drafting and verification are priced per sequence (overhead_per_seq), not per row
        if masks and self.mask_step_cost > MIN_MASK_COST:
            rest = seconds - self.plain_factor[b] * plain - self.marginal_factor[b] * extra
            self.mask_factor = self._mask_ratio.observe(rest, self.mask_step_cost)
            return
        if extra > 0:
            self.marginal_factor[b] = self._marginal_ratio[b].observe(seconds - self.plain_factor[b] * plain, extra)

    def close_gap(self) -> None:
        """The server's next call has arrived: the time outside the engine since the last step ends here.
        What the call does before its step (a new batch's tokenizing and checks, a concatenation) is the
        new requests' cost, not the cost of the step before; charged to it, a step followed by a Prefill
        looked 10-50 ms slower (through the shard, mostly plain steps, as the batch shrank towards one)."""
        self._observe_gap(None)

    def _observe_gap(self, num_seqs: int | None) -> None:
        """Learn `outside` from the time since the last step ended (not across idle pauses), and record
        the last step's rate with that gap, its own: a step that emitted more tokens costs the server and
        the router more outside the engine too (`defer_rate`). num_seqs: the batch size to learn it for
        (None: the last step's)."""
        pending, self._pending_rate = self._pending_rate, None
        if self._step_end is None or not self.adaptive:
            return
        gap = time.perf_counter() - self._step_end
        self._step_end = None
        if num_seqs is None:
            num_seqs = pending[0] if pending is not None else None
        if gap < MAX_GAP and num_seqs is not None:
            b = _bucket(num_seqs)
            self.outside[b] = 0.9 * self.outside[b] + 0.1 * gap
        if pending is not None:
            *args, floor = pending
            self.observe_rate(*args, outside=gap if gap < MAX_GAP else None, floor=floor)

    def defer_rate(self, num_seqs: int, seconds: float, tokens: int, kind: str, sampled: str | bool = False,
                   floor: float = 0.0) -> None:
        """`observe_rate` of the step that just ran, once the time until the next step is known (with a pinned
        curve, now: nothing is learnt from timing then)."""
        if self.adaptive:
            self._pending_rate = (num_seqs, seconds, tokens, kind, sampled, floor)
        else:
            self.observe_rate(num_seqs, seconds, tokens, kind, sampled, floor=floor)

    def rows_cost(self, num_seqs: int, rows: int, masks: bool = False, sampled: bool = False) -> float:
        """Predicted seconds a decode step of `num_seqs` sequences pays for `rows` rows beyond one each, and for
        mask groups when `masks` (0 before the latency surface is measured)."""
        if self.curve is None or rows <= num_seqs:
            return 0.0
        plain = self.step_cost(num_seqs, num_seqs, num_seqs, sampled)
        extra = self.step_cost(num_seqs, rows, num_seqs, sampled) - plain
        return max(0.0, extra) + (self.mask_factor * self.mask_step_cost if masks else 0.0)

    def take_step_start(self) -> float:
        """When this step's planning began (now, if it was not planned); cleared for the next step."""
        start, self.step_start = self.step_start, None
        return start if start is not None else time.perf_counter()

    def step_done(self) -> None:
        """The engine finished a step (its tokens are going out now)."""
        self._step_end = time.perf_counter()

    def end_step(self, num_spec: int, num_sent: int, num_accepted: int, sampled: bool = False) -> None:
        """After a planned step: update the per-sequence overhead and the value of a sent node."""
        if num_spec and self.adaptive:
            self.overhead_per_seq[sampled] = 0.9 * self.overhead_per_seq[sampled] + 0.1 * self._busy / num_spec
        if num_sent:
            self.value_per_row[sampled] = 0.9 * self.value_per_row[sampled] + 0.1 * num_accepted / num_sent
        self._step_busy, self._busy = self._busy, 0.0

    def _capped(self, tree: DraftTree, depth_cap: int) -> DraftTree:
        """`tree` within max_tree_nodes (the best-scored nodes) and `depth_cap` (itself when it fits)."""
        if len(tree) <= self.policy.max_tree_nodes and tree.max_depth <= depth_cap:
            return tree
        keep = [i for i in range(len(tree)) if tree.depth(i) <= depth_cap]
        return tree.subtree(sorted(keep, key=lambda i: -tree.scores[i])[: self.policy.max_tree_nodes])

    def _choose(self, planned: list[tuple[Sequence, SeqPlan]], idx: list[int], proposals: list[Proposal],
                sampled: bool, group_cost: float = 0.0) -> list:
        """The planner's choice for the sequences `idx` of `planned` (their `proposals`), the step's other
        sequences sending their plans as they are, at the step's predicted cost (`plan`)."""
        chosen = set(idx)
        others = [p for i, (_, p) in enumerate(planned) if i not in chosen]
        base_rows = sum(p.num_rows for _, p in planned)
        overhead = self.overhead_per_seq[sampled] * len(idx) + self.outside[_bucket(len(planned))]
        return plan(proposals, self._cost_of_rows(base_rows, len(planned), overhead, sampled),
                    self._row_budget(base_rows), other_rows=sum(p.num_rows for p in others), other_seqs=len(others),
                    group_cost=group_cost)

    def _proposal(self, seq: Sequence, base: SeqPlan) -> Proposal:
        remaining = seq.params.max_new_tokens - len(seq.output_ids)
        tree = self._capped(self._current_tree(seq), min(self.policy.max_tree_depth, remaining - 1))
        group = self.group_size if remaining > 1 else 0
        regime = seq_regime(seq.params)
        share = self.mask_worth[regime].value if seq.suffix_matched else 1.0
        values = tuple(v * share for v in self._mask_values_of(regime))
        # learnt from verification like the cost factors, so not with a pinned curve (reproducible plans)
        survival = self._survival(regime, tree) if self.adaptive and self.policy.survival_calibration else ()
        return Proposal(len(base.chain), tree, group, values[group - 1] if group else 0.0, values, survival)

    def _survival(self, regime: str, tree: DraftTree) -> tuple[float, ...]:
        """What the planner values each node at: its drafter's survival calibration of its drafted score, at
        most its parent's value (the drafters' curves differ; no child may be worth more than its parent)."""
        out: list[float] = []
        for score, source, parent in zip(tree.scores, tree.sources, tree.parents):  # parents come first
            value = self.survival[regime, source].value(score)
            out.append(value if parent == ROOT else min(value, out[parent]))
        return tuple(out)

    def _mask_values_of(self, regime: str) -> tuple[float, ...]:
        """`mask_values(regime)`, computed once per step."""
        if regime not in self._step_mask_values:
            self._step_mask_values[regime] = self.mask_values(regime)
        return self._step_mask_values[regime]

    def mask_values(self, regime: str = "greedy") -> tuple[float, ...]:
        """Expected tokens a mask group adds next step, by its rows 1..group_size (when anchored at the last
        accepted node): the sum over depths of the chance its drafts extend the accepted path that far, from
        the calibration. Small groups are what pays where rows are dear (a compute-bound CPU)."""
        out, reach, total = [], 1.0, 0.0
        for depth in range(1, self.group_size + 1):
            reach *= self.calibrations[regime].extension("masks", depth, MASK_EXTEND_PRIOR)
            total += reach
            out.append(total)
        return tuple(out)

    def _current_tree(self, seq: Sequence) -> DraftTree:
        """The drafted tree of the last step, or (first step) suffix drafts from the prompt."""
        if seq.draft_tree is None:
            seq.draft_tree = self._suffix(seq)
        return seq.draft_tree

    def _record_plan(self, out, proposals: list[Proposal], choices) -> None:
        self.stats.steps += 1
        self.stats.rows += sum(p.num_rows for _, p in out)
        self.stats.predicted_tokens += len(out) + sum(
            pr.node_values()[i] for pr, ch in zip(proposals, choices) for i in ch.nodes
        )
        if all(not p.num_candidates and not p.anchors for _, p in out):
            self.stats.plain_steps += 1

    # ---- verification --------------------------------------------------------------------

    def verify(
        self, seq: Sequence, plan: SeqPlan, logits: torch.Tensor, stats: LogitStats, target: torch.Tensor | None = None
    ) -> tuple[list[int], int, torch.Tensor | None]:
        """(accepted node indices, bonus token, processed target rows [len(path) + 1, V] of the emitted
        tokens, or None when `stats`, the step's logit statistics from the sequence's first row, hold
        everything: raw greedy, `reads_stats`). `target`: the rows processed already, when they were."""
        start = time.perf_counter()
        tree, params = plan.tree, seq.params
        if target is None and not reads_stats(params):
            target = _process_rows(logits, seq, tree)  # [n + 1, V]
        if params.is_raw_greedy:  # the argmax of the raw rows, taken for the whole step at once
            path, bonus = verify_tree_greedy(stats.argmax(0, len(tree) + 1), tree)
        elif params.is_greedy:
            path, bonus = verify_tree_greedy(target.argmax(-1).tolist(), tree)
        elif tree.sampled is not None:  # children drawn from q (SDSAT): recursive rejection
            path, bonus = verify_tree_rejection(target, tree, tree.sampled, seq.generator)
        else:
            path, bonus = verify_tree_sampled(target, tree, seq.generator)
        self._observe(tree, path, seq_regime(params))
        if self.policy.survival_calibration and not seq.sdsat:  # the planner's nodes (SDSAT's are not planned)
            regime, reached = seq_regime(params), set(path)
            for i, (score, source) in enumerate(zip(tree.scores, tree.sources)):
                self.survival[regime, source].add(score, i in reached)
        if seq.mask_expect is not None and len(tree):
            self._learn_mask_worth(seq.mask_expect, [tree.tokens[i] for i in path])
        seq.mask_expect = None
        self._busy += time.perf_counter() - start
        return path, bonus, None if target is None else target[[0] + [i + 1 for i in path]]

    def _observe(self, tree: DraftTree, path: list[int], regime: str) -> None:
        self.calibrations[regime].observe(tree, {ROOT, *path}, set(path))
        self.stats.realised_tokens += len(path) + 1
        for i in range(len(tree)):
            src = tree.sources[i]
            self.stats.drafted_by_drafter[src] = self.stats.drafted_by_drafter.get(src, 0) + 1
        for i in path:
            src = tree.sources[i]
            self.stats.accepted_by_drafter[src] = self.stats.accepted_by_drafter.get(src, 0) + 1
        if any(s == "masks" for s in tree.sources):
            gained = sum(tree.sources[i] == "masks" for i in path)
            self.mask_gain = 0.9 * self.mask_gain + 0.1 * gained

    def _learn_mask_worth(self, expect: tuple[str, float, dict], path: list[int]) -> None:
        """`expect`: (regime, the mask drafts' predicted value, the suffix tree's nodes by (parent, token));
        `path`: the accepted tokens. The masks' own gain is the accepted tokens past
        the deepest the suffix tree covered."""
        key, predicted, suffix = expect
        node, covered = ROOT, 0
        for token in path:
            node = suffix.get((node, token))
            if node is None:
                break
            covered += 1
        self.mask_worth[key].observe(len(path) - covered, predicted)

    # ---- drafting ------------------------------------------------------------------------

    def draft_next(
        self, seq: Sequence, plan: SeqPlan, groups: torch.Tensor, path: list[int], stats: LogitStats
    ) -> None:
        """The next step's tree: mask drafts from the group on the accepted path nearest its end, and suffix
        drafts. `stats`: the step's logit statistics from the sequence's first row (the groups' best tokens)."""
        start = time.perf_counter()
        regime, matched = seq_regime(seq.params), seq.suffix_matched  # as when this step was planned
        calibration = self.calibrations[regime]
        trees = [self._suffix(seq)]
        seq.mask_expect = None
        found = _mask_rows(plan, path)
        if found is not None and found[1] < plan.group_size:
            j, offset = found
            values = self._step_mask_values.get(regime, ())
            if matched and plan.group_size - offset <= len(values):
                suffix = trees[0]  # (before `merge` extends it)
                nodes = {(suffix.parents[i], suffix.tokens[i]): i for i in range(len(suffix))}
                seq.mask_expect = (regime, values[plan.group_size - offset - 1], nodes)
            m = self.policy.mask_top_m
            if m <= MAX_TOP:  # group rows follow the n + 1 verify rows
                first = plan.num_candidates + 1 + j * plan.group_size
                tops = [stats.top(r, m) for r in range(first + offset, first + plan.group_size)]
                trees.append(mask_tree_of(tops, calibration))
            else:
                trees.append(mask_tree(groups[j, offset:], calibration, m))
        seq.draft_tree = merge(trees) if not seq.is_finished else DraftTree()
        self._busy += time.perf_counter() - start

    def _suffix(self, seq: Sequence) -> DraftTree:
        if "suffix" not in self.policy.drafters:
            return DraftTree()
        if seq.suffix_index is None:
            seq.suffix_index = SuffixIndex(self.policy.suffix_max_match)
        seq.suffix_index.extend(seq.tokens[len(seq.suffix_index.tokens) :])
        conts, source = self._continuations(seq)
        tree = trie_tree(conts, self.calibrations[seq_regime(seq.params)], self.policy.max_tree_nodes, source)
        seq.suffix_matched = len(tree) > 0
        return tree

    def _continuations(self, seq: Sequence) -> tuple[list[list[int]], str]:
        """What followed the longest match of the sequence's suffix, and its drafter: in its own text, or in
        the shared cache's outputs or the datastore when one of them matches longer (ties: the own text, then
        the shared cache)."""
        min_n, depth = self.policy.suffix_min_match, self.policy.max_tree_depth
        n, conts = seq.suffix_index.continuations(min_n, depth, SUFFIX_MATCHES)
        best = (n, conts, "suffix")
        for source, index in (("shared", self.shared.index if self.shared else None), ("datastore", self.datastore)):
            if index is not None:
                found, found_conts = index.lookup(seq.tokens, min_n, depth, SUFFIX_MATCHES)
                if found > best[0]:
                    best = (found, found_conts, source)
        return best[1], best[2]

    def finished(self, seq: Sequence) -> None:
        """A request ended: its output joins the shared suffix cache, when there is one (not a failed one's)."""
        if self.shared is not None and seq.error is None and seq.speculate:
            self.shared.add(seq.output_ids)

    def info(self) -> dict:
        """The latency curve, the calibration and the running figures (for /info, logs, benchmarks)."""
        s = self.stats
        return {
            "latency_ms": self.curve.as_dict() if self.curve else None,
            "overhead_ms_per_sequence": {("sampled" if k else "greedy"): 1000 * v for k, v in self.overhead_per_seq.items()},
            "value_per_row": {("sampled" if k else "greedy"): v for k, v in self.value_per_row.items()},
            "plain_factor": _by_regime(self.plain_factor), "marginal_factor": _by_regime(self.marginal_factor),
            "mask_step_ms": 1000 * self.mask_step_cost, "mask_factor": self.mask_factor,
            "outside_ms_per_step": {b: 1000 * t for b, t in self.outside.items()},
            "tokens_per_s_by_batch": dict(self.rates),
            "calibration": {regime: c.table() for regime, c in self.calibrations.items()},
            "survival_calibration": {f"{regime}/{source}": c.table() for (regime, source), c in self.survival.items()},
            "mask_gain": self.mask_gain, "mask_values_by_group_rows": list(self.mask_values()),
            "mask_worth": {regime: w.value for regime, w in self.mask_worth.items()},
            "shared_suffix_tokens": len(self.shared.index.tokens) if self.shared else None,
            "datastore_tokens": len(self.datastore.tokens) if self.datastore else None,  # separators included
            "steps": s.steps, "plain_fallback_rate": s.plain_steps / max(1, s.steps),
            "rows_per_step": s.rows / max(1, s.steps),
            "predicted_tokens_per_step": s.predicted_tokens / max(1, s.steps),
            "accepted_by_drafter": s.accepted_by_drafter, "drafted_by_drafter": s.drafted_by_drafter,
        }


def _mask_rows(plan: SeqPlan, path: list[int]) -> tuple[int, int] | None:
    """(group index, first row in it) of the group anchored at the deepest accepted node that has one:
    its rows from there on predict the positions after the new bonus token."""
    anchor_of = {a: j for j, a in enumerate(plan.anchors)}
    chain = [ROOT] + path  # accepted nodes, root first; anchors count candidates: node i -> i + 1
    for depth in range(len(chain) - 1, -1, -1):
        j = anchor_of.get(chain[depth] + 1)
        if j is not None:
            return j, len(chain) - 1 - depth
    return None


def _tree_plan(base: SeqPlan, proposal: Proposal, choice) -> SeqPlan:
    """The base plan (uncached tokens only) plus the chosen nodes as a candidate tree and the chosen groups."""
    tree = proposal.tree.subtree(choice.nodes)
    index = {old: new for new, old in enumerate(sorted(choice.nodes))}
    anchors = sorted(0 if a == ROOT else index[a] + 1 for a in choice.anchors)
    return SeqPlan(
        chain=list(base.chain) + tree.tokens,
        num_candidates=len(tree),
        anchors=anchors,
        group_size=(choice.group_size or proposal.group_size) if anchors else 0,
        num_cached=base.num_cached,
        parents=tuple(tree.parents),
        tree=tree,
    )


def _process_rows(logits: torch.Tensor, seq: Sequence, tree: DraftTree) -> torch.Tensor:
    """Processed logits of the root row and every node row; a row's history ends with its own path
    (built only when penalties or a watermark make the history matter)."""
    params = seq.params
    if not params.has_penalties and params.watermark is None:
        return process(logits, params, seq.tokens)
    paths = [[]] + [[tree.tokens[j] for j in tree.path(i)] for i in range(len(tree))]
    return torch.cat([process(logits[r : r + 1], params, seq.tokens + paths[r]) for r in range(len(paths))])


def sampling_regime(planned: list[tuple[Sequence, SeqPlan]]) -> str:
    """The governor's regime of a step: "greedy", "sampled", or "hot" when a sequence samples at a temperature
    of at least HOT_TEMPERATURE (drafts are rarely accepted there: its figures must not stop speculation at
    T = 0.2, nor T = 0.2's keep paying for tries at T = 1)."""
    regimes = {seq_regime(seq.params) for seq, _ in planned}
    return next((r for r in ("hot", "sampled") if r in regimes), "greedy")


def seq_regime(params) -> str:
    """One sequence's regime: "greedy", "sampled", or "hot" (sampling at HOT_TEMPERATURE or above)."""
    if params.is_greedy:
        return "greedy"
    return "hot" if params.temperature >= HOT_TEMPERATURE else "sampled"


def _loss_period(slowdown: float, burst: int) -> int:
    """The exploring period at which bursts of `burst` steps, each `slowdown` times a plain step's time per
    token, cost about EXPLORE_OVERHEAD of the time (at least EXPLORE_EVERY, at most MAX_LOSS_EXPLORE_EVERY)."""
    period = math.ceil(burst * max(0.0, slowdown - 1.0) / EXPLORE_OVERHEAD)
    return max(EXPLORE_EVERY, min(MAX_LOSS_EXPLORE_EVERY, period))


def any_sampled(planned: list[tuple[Sequence, SeqPlan]]) -> bool:
    """Whether any sequence of the step samples (the planner keeps its figures apart for such steps)."""
    return any(not seq.params.is_greedy for seq, _ in planned)


def _explore(gated: dict, key, every: int, burst: int) -> bool:
    """Count one step kept from what it would try under `key`; True for the last `burst` steps of every
    `every`, consecutive (a step's mask drafts are verified by the next one, an SDSAT draft pass by its
    verify pass). `gated[key]`: the steps kept since the last burst, or inside a burst minus the steps it still
    has (0 after its last). `every` follows the measured rates and moves from step to step: a burst, once
    begun, runs to its end, and the next begins `every - burst` kept steps later. (A count taken modulo a
    moving period, as before 2026-12-07, started bursts at random steps and cut them short: at batch 1 the
    count never restarts, and SDSAT draft passes ran without their verify pass.)"""
    count = gated[key]
    if count < 0:
        gated[key] = count + 1
        return True
    if count + 1 <= every - burst:
        gated[key] = count + 1
        return False
    gated[key] = 1 - burst
    return True


def explore_share(spec: list[int], seq_ids: list[int], round_: int) -> list[int]:
    """The members of `spec` that draft in an exploring step: all of a small batch, else about
    1/EXPLORE_FRACTION of it (at least EXPLORE_MIN_SEQS), picked by a hash of sequence id and round, so
    every sequence takes its turn and a burst's steps keep the same share."""
    size = max(EXPLORE_MIN_SEQS, -(-len(spec) // EXPLORE_FRACTION))
    if size >= len(spec):
        return spec
    order = sorted(range(len(spec)), key=lambda j: ((seq_ids[j] + round_) * 2654435761) % 2**32)
    return sorted(spec[j] for j in order[:size])


def _factor_key(num_seqs: int, sampled: bool) -> tuple[int, bool]:
    """The key a step's cost corrections are kept under: its batch bucket, and whether it samples."""
    return _bucket(num_seqs), sampled


def _by_regime(factors: dict[tuple[int, bool], float]) -> dict[str, float]:
    """Cost corrections keyed as in /info: "1/greedy", "16/sampled", ..."""
    return {f"{b}/{'sampled' if sampled else 'greedy'}": f for (b, sampled), f in factors.items()}


def gate_margin(key: str) -> float:
    """How much faster than plain steps speculative steps must be measured to go on at a governor key's batch
    size: 1 for one sequence, GATE_MARGIN_PER_DOUBLING more per doubling, at most MAX_GATE_MARGIN. What the
    step rates miss grows with the batch: speculation lets requests finish apart, so their replacements are
    prefilled one by one (each joined step costs a few ms more than the decode step it replaces, and is not
    rated), and plain steps measured among speculative ones run slower than plain steps in a row. Through
    the shard at 8 sequences SDSAT was rated 1.02x plain and ran at 0.83x; the planned step with suffix
    drafts was rated 1.29x and ran at 1.01-1.09x."""
    return min(MAX_GATE_MARGIN, 1.0 + GATE_MARGIN_PER_DOUBLING * math.log2(_batch_of(key)))


def _rate_key(num_seqs: int, regime: str | bool) -> str:
    """The governor's key of a step: its batch size and its `sampling_regime` (True/False: sampled/greedy)."""
    if isinstance(regime, bool):
        regime = "sampled" if regime else "greedy"
    return f"{num_seqs}/{regime}"


def _size_class(key: str) -> str:
    """The key of a governor key's size class: batch sizes 1, 2, 3, 4-5, 6-7, 8-11, 12-15, 16-23, ... (two
    classes per power of two) share exploring periods ("37/greedy" -> "32/greedy")."""
    size, regime = _batch_of(key), key.rsplit("/", 1)[1]
    top = 1 << (size.bit_length() - 1)
    half = top >> 1
    return f"{top + half if half and size >= top + half else top}/{regime}"


def _batch_of(key: str) -> int:
    """The batch size of a governor key or counter ("16/greedy" -> 16, "sdsat:4/sampled" -> 4)."""
    return int(key.rsplit(":", 1)[-1].split("/", 1)[0])


def _bucket(num_seqs: int) -> int:
    """The probed batch size a step's correction factors are kept under (the nearest one above, or the last)."""
    return next((b for b in PROBE_BATCHES if num_seqs <= b), PROBE_BATCHES[-1])


EXPLORE_EVERY = 24  # while speculation is measured to lose at a batch size, EXPLORE_BURST steps in this many try it
MAX_EXPLORE_EVERY = 96  # the longest exploring period a batch larger than one backs off to
EXPLORE_OVERHEAD = 0.04  # while speculation loses by a measured factor, tries are spaced to cost about this share
MAX_LOSS_EXPLORE_EVERY = 384  # ... but one comes at least this often
HOT_TEMPERATURE = 0.7  # sampling at this temperature or above is governed apart ("hot")
MASKS_EXPLORE_EVERY = 48  # the same for mask groups (rarer: a losing masked step can cost ~2 plain steps)
EXPLORE_MIN_SEQS = 4  # an exploring step drafts for all of a batch this small ...
EXPLORE_FRACTION = 4  # ... and for about a quarter of a larger one
EXPLORE_BURST = 3  # consecutive steps per try: the first sends mask groups, the next ones verify their drafts
PLAIN_EVERY = 32  # while speculation is judged to pay, plain steps come back about once in this many (a fresh comparison)
PLAIN_MISSING_EVERY = 4  # the same while plain steps were never measured at a batch size
PLAIN_BURST = 2  # ... for this many steps in a row: the first plain step after speculative ones is not rated
EXPLORE_BURST_SDSAT = 2  # an SDSAT try: a draft pass, then the verify pass of its drafts
MAX_GAP = 0.25  # seconds: a longer pause between steps is idleness (no work queued), not serving cost
MASK_EXTEND_PRIOR = 0.7  # before any is measured: the chance a mask draft extends the accepted path, per depth
SDSAT_EXTEND_PRIOR = 0.7  # ... and an SDSAT draft (`sdsat_depth`; what a depth never sent is taken to be worth)
MIN_MASK_COST = 2e-4  # seconds: below this the mask groups' own cost is noise, not learnt
RATE_WINDOW = 5  # steps of a kind whose median is its rate (robust to two slow steps in five)
SPEC_WINDOW = 9  # speculative steps (SDSAT: pairs) whose tokens over seconds is their rate (the slowest left out)
NEAR_SIZES = 2  # a batch size with no comparison of its own borrows that of a size at most this factor away
GATE_MARGIN_PER_DOUBLING = 0.05  # `gate_margin`: what speculation must beat plain steps by, per doubling of the batch
MAX_GATE_MARGIN = 1.2  # ... at most

PROBE_ROWS_PER_SPECULATOR = 12  # a typical speculating sequence: uncached token, a tree and a group


def probe_row_counts(num_seqs: int, rows: int) -> list[int]:
    """Rows per sequence for a latency probe: the extra rows concentrated on a few sequences (as the
    planner does), ~12 each, the others plain; so the probe pays the same grouping and padding."""
    counts = [1] * num_seqs
    extra, i = rows - num_seqs, 0
    while extra > 0:
        add = min(extra, PROBE_ROWS_PER_SPECULATOR - 1)
        if i == num_seqs:  # more than 12 rows for everybody: spread the rest evenly
            for j in range(extra):
                counts[j % num_seqs] += 1
            break
        counts[i] += add
        extra -= add
        i += 1
    return counts


def measure_forward(run: Callable[[], None], repeats: int = 3) -> float:
    """Median seconds of `run()` after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass(frozen=True)
class Gate:
    """What `_measured_to_pay` compares with plain steps: the rate kinds of a way to speculate, the prefix
    of its counters (gates share the key's rates, not their exploring periods) and its exploring burst."""

    kinds: tuple[str, ...]
    prefix: str
    burst: int


SPACE_KINDS = ("tree", "masks")  # the planned SPACE step's speculative steps (observe_rate kinds)
SPACE_GATE = Gate(("spec",), "", EXPLORE_BURST)  # ... judged all together (`_observe_summed`)
SDSAT_GATE = Gate(("sdsat",), "sdsat:", EXPLORE_BURST_SDSAT)  # SDSAT's passes
