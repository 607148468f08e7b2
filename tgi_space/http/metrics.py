"""Prometheus metrics: TGI's router names where they exist, plus SPACE's speculation figures.

TGI's exporter writes counters without the `_total` suffix (`tgi_request_count 3`), so
its counters are rendered that way here and dashboards built for TGI keep working;
this project's own counters keep the Prometheus convention (`tgi_space_drafts_total`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.utils import floatToGoString

from tgi_space.sequence import SeqStats

_DURATION = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
TGI_COUNTERS = {
    "tgi_request_count", "tgi_request_success", "tgi_request_failure",
    "tgi_batch_inference_count", "tgi_batch_inference_success",
}


class Metrics:
    """All series of one server, in a registry of its own (thread-safe: the engine thread updates too)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.request_count = Counter("tgi_request_count", "Total number of requests", registry=r)
        self.request_success = Counter("tgi_request_success", "Number of successful requests", registry=r)
        self.request_failure = Counter("tgi_request_failure", "Number of failed requests", ["err"], registry=r)
        self.request_duration = Histogram("tgi_request_duration", "Total time spent processing the request", buckets=_DURATION, registry=r)
        self.validation_duration = Histogram("tgi_request_validation_duration", "Time spent validating the request", buckets=_DURATION, registry=r)
        self.queue_duration = Histogram("tgi_request_queue_duration", "Time spent in the queue per request", buckets=_DURATION, registry=r)
        self.inference_duration = Histogram("tgi_request_inference_duration", "Request inference duration", buckets=_DURATION, registry=r)
        self.time_per_token = Histogram("tgi_request_mean_time_per_token_duration", "Mean time per token per request", buckets=_DURATION, registry=r)
        self.generated_tokens = Histogram("tgi_request_generated_tokens", "Generated tokens per request", buckets=_TOKENS, registry=r)
        self.input_length = Histogram("tgi_request_input_length", "Input token length per request", buckets=_TOKENS, registry=r)
        self.max_new_tokens = Histogram("tgi_request_max_new_tokens", "Maximum new tokens per request", buckets=_TOKENS, registry=r)
        self.skipped_tokens = Histogram("tgi_request_skipped_tokens", "Speculated tokens per request", buckets=_TOKENS, registry=r)
        self.batch_size = Gauge("tgi_batch_current_size", "Current batch size", registry=r)
        self.queue_size = Gauge("tgi_queue_size", "Current queue size", registry=r)
        self.batch_inference_count = Counter("tgi_batch_inference_count", "Inference calls per method (prefill or decode)", ["method"], registry=r)
        self.batch_inference_success = Counter("tgi_batch_inference_success", "Number of successful inference calls per method (prefill or decode)", ["method"], registry=r)
        self.batch_inference_duration = Histogram("tgi_batch_inference_duration", "Batch inference duration", ["method"], buckets=_DURATION, registry=r)
        self.batch_next_size = Histogram("tgi_batch_next_size", "Batch size of the next batch", buckets=_TOKENS, registry=r)
        # SPACE: drafts are the candidates a sequence verifies in one step
        self.drafts = Counter("tgi_space_drafts", "Verification steps with at least one candidate (per sequence)", registry=r)
        self.drafted_tokens = Counter("tgi_space_drafted_tokens", "Candidate tokens verified", registry=r)
        self.accepted_tokens = Counter("tgi_space_accepted_tokens", "Candidate tokens accepted", registry=r)
        self.drafted_by_position = Counter("tgi_space_drafted_by_position", "Candidates verified, by candidate position (1 = first after the bonus token)", ["position"], registry=r)
        self.accepted_by_position = Counter("tgi_space_accepted_by_position", "Candidates accepted, by candidate position", ["position"], registry=r)
        self.tokens_per_step = Histogram("tgi_space_tokens_per_step", "Tokens emitted by one sequence in one forward step", buckets=tuple(range(1, 18)), registry=r)
        self.mean_tokens_per_step = Gauge("tgi_space_mean_tokens_per_step", "Mean tokens per sequence-step since start", registry=r)
        self.current_k = Gauge("tgi_space_current_k", "Candidates per sequence (k) chosen for the last step", registry=r)
        self.kv_free_blocks = Gauge("tgi_space_kv_cache_free_blocks", "KV-cache blocks owned by no request", registry=r)
        self.kv_total_blocks = Gauge("tgi_space_kv_cache_blocks", "KV-cache blocks in total", registry=r)
        self.prefix_cached_blocks = Gauge("tgi_space_prefix_cache_blocks", "KV blocks in the prefix cache (held or idle)", registry=r)
        self.prefix_cached_tokens = Gauge("tgi_space_prefix_cache_hit_tokens", "Prompt tokens read from the prefix cache instead of computed, since start", registry=r)
        # the planned step (docs/speculation.md)
        self.planner_rows = Gauge("tgi_space_planner_rows_per_step", "Query rows per step, mean since start", registry=r)
        self.planner_predicted = Gauge("tgi_space_planner_predicted_tokens_per_step", "Tokens per step the planner expected (sequences + chosen survival scores), mean", registry=r)
        self.planner_realised = Gauge("tgi_space_planner_realised_tokens_per_step", "Tokens per step verification emitted, mean", registry=r)
        self.planner_plain = Gauge("tgi_space_planner_plain_fallback_rate", "Share of steps that sent no candidate and no mask (plain decoding)", registry=r)
        self.drafter_drafted = Counter("tgi_space_drafter_drafted", "Tree nodes sent for verification, by drafter", ["drafter"], registry=r)
        self.drafter_accepted = Counter("tgi_space_drafter_accepted", "Tree nodes accepted, by drafter", ["drafter"], registry=r)
        self._drafter_seen: dict[tuple[str, str], int] = {}
        self._steps = 0
        self._tokens = 0

    def record_step(self, emitted: int, drafted: list[int], accepted: list[int]) -> None:
        """One sequence's step: tokens emitted, and per position whether a candidate was verified/accepted."""
        self.tokens_per_step.observe(emitted)
        self._steps += 1
        self._tokens += emitted
        self.mean_tokens_per_step.set(self._tokens / self._steps)
        if not any(drafted):
            return
        self.drafts.inc()
        self.drafted_tokens.inc(sum(drafted))
        self.accepted_tokens.inc(sum(accepted))
        for i, (d, a) in enumerate(zip(drafted, accepted), start=1):
            if d:
                self.drafted_by_position.labels(position=str(i)).inc(d)
            if a:
                self.accepted_by_position.labels(position=str(i)).inc(a)

    def record_speculation(self, stats) -> None:
        """The planned step's running figures (a `speculation.SpeculationStats`), after each engine step."""
        steps = max(1, stats.steps)
        self.planner_rows.set(stats.rows / steps)
        self.planner_predicted.set(stats.predicted_tokens / steps)
        self.planner_realised.set(stats.realised_tokens / steps)
        self.planner_plain.set(stats.plain_steps / steps)
        for kind, totals, counter in (("drafted", stats.drafted_by_drafter, self.drafter_drafted),
                                      ("accepted", stats.accepted_by_drafter, self.drafter_accepted)):
            for drafter, total in totals.items():
                seen = self._drafter_seen.get((kind, drafter), 0)
                if total > seen:
                    counter.labels(drafter=drafter).inc(total - seen)
                    self._drafter_seen[(kind, drafter)] = total

    def record_request_stats(self, stats: SeqStats) -> None:
        """A finished request: the tokens speculation saved it (TGI's `skipped_tokens`)."""
        self.skipped_tokens.observe(sum(stats.tokens_per_step) - stats.num_steps)

    def watch(self, engine) -> None:
        """Also export `engine`'s decode totals and latency curve, read at each scrape (`EngineCollector`)."""
        self.registry.register(EngineCollector(engine))

    def render(self) -> str:
        """Prometheus text format; TGI's counters without `_total`, no `_created` series."""
        lines = []
        for family in self.registry.collect():
            name = family.name
            legacy = family.type == "counter" and name in TGI_COUNTERS
            shown = name if legacy or family.type != "counter" else name + "_total"
            lines.append(f"# HELP {shown} {family.documentation}")
            lines.append(f"# TYPE {shown} {family.type}")
            for s in family.samples:
                if s.name.endswith("_created"):
                    continue
                sample = name if legacy else s.name
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                lines.append(f"{sample}{{{labels}}} {floatToGoString(s.value)}" if labels else f"{sample} {floatToGoString(s.value)}")
        return "\n".join(lines) + "\n"


class EngineCollector:
    """An engine's running decode totals (`engine.DecodeTotals`) and measured latency curve, read when scraped
    (the engine thread only adds to them). Over a window, the differences of the totals give rows and tokens
    per step, and `tgi_space_decode_curve_seconds_total` the ceiling: (tokens / sent) / (sequences / plain).
    With `drafters`, also the drafts sent and accepted by drafter (the shard has no per-step metrics)."""

    def __init__(self, engine, drafters: bool = False) -> None:
        self.engine = engine
        self.drafters = drafters

    def collect(self):
        t = self.engine.totals
        for name, value, doc in (
            ("steps", t.steps, "Decode steps (forward passes with no prompt rows)"),
            ("sequences", t.sequences, "Sequences in decode steps, summed over steps"),
            ("rows", t.rows, "Query rows sent in decode steps (one per sequence in plain decoding)"),
            ("tokens", t.tokens, "Tokens emitted by decode steps"),
            ("seconds", t.seconds, "Wall time of decode steps, seconds"),
        ):
            yield CounterMetricFamily(f"tgi_space_decode_{name}", doc, value=value)
        curve = CounterMetricFamily("tgi_space_decode_curve_seconds", "Decode steps' cost on the measured latency "
                                    "curve: of the rows sent, and of one row per sequence", labels=["rows"])
        curve.add_metric(["sent"], t.curve_seconds)
        curve.add_metric(["plain"], t.curve_plain_seconds)
        yield curve
        yield from self._curve()
        if self.drafters:
            yield from self._drafters()

    def _curve(self):
        surface = self.engine.speculator.curve
        if surface is None:
            return
        gauge = GaugeMetricFamily("tgi_space_latency_ms", "Measured forward latency t(rows) by batch size, ms",
                                  labels=["batch", "rows"])
        for batch, points in surface.as_dict().items():
            for rows, ms in points.items():
                gauge.add_metric([str(batch), str(rows)], ms)
        yield gauge

    def _drafters(self):
        stats = self.engine.speculator.stats
        for kind, totals in (("drafted", dict(stats.drafted_by_drafter)), ("accepted", dict(stats.accepted_by_drafter))):
            family = CounterMetricFamily(f"tgi_space_drafter_{kind}", f"Tree nodes {kind}, by drafter", labels=["drafter"])
            for drafter, total in sorted(totals.items()):
                family.add_metric([drafter], total)
            yield family
