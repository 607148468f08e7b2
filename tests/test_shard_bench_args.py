"""benchmarks/shard_bench.py's workload: request counts per concurrency and spread output lengths."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import shard_bench  # noqa: E402

MODEL = str(ROOT / "models" / "tiny-space-py")


def test_without_a_spread_every_request_generates_the_same_number_of_tokens():
    args = shard_bench.parse_args(["--model", MODEL, "--max-new-tokens", "64"])
    assert {shard_bench.new_tokens(args, i) for i in range(200)} == {64}
    assert args.longest == 64


def test_spread_lengths_cover_the_range_evenly_around_the_mean():
    args = shard_bench.parse_args(["--model", MODEL, "--max-new-tokens", "64", "--length-spread", "0.5"])
    lengths = [shard_bench.new_tokens(args, i) for i in range(256)]
    assert min(lengths) >= 32 and max(lengths) <= args.longest == 96
    assert abs(sum(lengths) / len(lengths) - 64) < 1  # the same tokens in all, on average, as without a spread
    quarters = [sum(1 for n in lengths if lo <= n < lo + 16) for lo in (32, 48, 64, 80)]
    assert min(quarters) > 256 / 4 * 0.8  # evenly spread, not bunched
    assert len(set(lengths[:8])) == 8  # neighbours (started together) finish apart


def test_waves_set_the_requests_per_in_flight_slot():
    args = shard_bench.parse_args(["--model", MODEL, "--requests", "64", "--waves", "8"])
    pool = [f"p{i}" for i in range(164)]
    assert len(shard_bench.requests_at(pool, args, 4)) == 64  # --requests is the floor
    served = shard_bench.requests_at(pool, args, 32)
    assert len(served) == 256 and served[164] == "p0"  # the pool cycles


@pytest.mark.parametrize("spread", ["-0.1", "1", "1.5"])
def test_a_spread_outside_0_to_1_is_refused(spread, capsys):
    with pytest.raises(SystemExit):
        shard_bench.parse_args(["--model", MODEL, "--length-spread", spread])
    assert "--length-spread" in capsys.readouterr().err


def test_admission_defaults_to_tgis_backpressure():
    assert shard_bench.parse_args(["--model", MODEL]).admission == "tgi"
    assert shard_bench.TGI_ADMISSION == {"waiting_served_ratio": 1.2, "max_waiting_tokens": 20}  # launcher defaults
    assert shard_bench.parse_args(["--model", MODEL, "--admission", "eager"]).admission == "eager"


def test_paired_ratios_compare_each_repetition_with_plain_decodings_run_of_the_same_repetition():
    plain = [{"tokens_per_s": 100.0}, {"tokens_per_s": 50.0}, {"tokens_per_s": 80.0}]  # the machine slowed in rep 1
    spec = [{"tokens_per_s": 110.0}, {"tokens_per_s": 55.0}, {"tokens_per_s": 96.0}]
    out = shard_bench.paired_ratios(spec, plain)
    assert out["ratios_by_repeat"] == pytest.approx([1.1, 1.1, 1.2])
    assert out["ratio_paired"] == pytest.approx(1.1)
    # the ratio of medians mixes repetitions: 96 / 80 = 1.2 here, where every pair says 1.1 or more
    medians = shard_bench.median_run(spec)["tokens_per_s"] / shard_bench.median_run(plain)["tokens_per_s"]
    assert medians == pytest.approx(1.2)


def test_the_control_setting_is_plain_decoding_on_a_shard_of_its_own():
    assert shard_bench.MODES["none-control"] == shard_bench.MODES["none"]
    assert "none-control" in shard_bench.parse_args(["--model", MODEL]).modes  # run by default


def test_the_shared_preamble_is_fixed_and_prepends_every_prompt():
    preamble = shard_bench.shared_preamble()
    assert preamble == shard_bench.shared_preamble() and preamble.startswith("# The Zen of Python")
    assert all(line.startswith("#") for line in preamble.splitlines() if line)  # comments: the code is unchanged
    assert shard_bench.parse_args(["--model", MODEL, "--shared-prefix"]).shared_prefix
    assert not shard_bench.parse_args(["--model", MODEL]).shared_prefix


@pytest.mark.parametrize("name", ["shard_bench_483cc43.json", "shard_bench_e2bb1f8.json"])  # without / with rows
def test_the_plot_draws_every_setting_from_a_saved_report(tmp_path, name):
    pytest.importorskip("matplotlib")
    import json

    report = json.loads((ROOT / "benchmarks" / "zen3" / name).read_text())
    path = tmp_path / "bench.png"
    shard_bench.plot(report, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image  # noqa: PLC0415  (matplotlib's own dependency)

    assert Image.open(path).size == (1870, 495)  # 17 x 4.5 inches at 110 dpi


def test_decode_figures_are_the_differences_of_two_scrapes_and_the_ceiling_is_the_issues_formula():
    """Batch 1, 10 steps of 5 rows emitting 3 tokens each, on a curve with t(1) = 1 ms and t(5) = 2 ms: the
    ceiling tau t(1) / t(rows) is 3 x 1 / 2 = 1.5. The totals before the window do not count."""
    names = ("steps", "sequences", "rows", "tokens", "seconds")
    before = {f"tgi_space_decode_{n}_total": v for n, v in zip(names, (7, 7, 7, 7, 0.05))}
    before |= {'tgi_space_decode_curve_seconds_total{rows="sent"}': 0.007,
               'tgi_space_decode_curve_seconds_total{rows="plain"}': 0.007}
    after = {f"tgi_space_decode_{n}_total": v for n, v in zip(names, (17, 17, 57, 37, 0.25))}
    after |= {'tgi_space_decode_curve_seconds_total{rows="sent"}': 0.027,
              'tgi_space_decode_curve_seconds_total{rows="plain"}': 0.017,
              'tgi_space_drafter_drafted_total{drafter="suffix"}': 40.0,
              'tgi_space_drafter_accepted_total{drafter="suffix"}': 20.0}
    got = shard_bench.decode_figures(before, after)
    assert got["decode_steps"] == 10 and got["mean_batch"] == 1.0
    assert got["rows_per_step"] == got["rows_per_sequence"] == 5.0 and got["tokens_per_sequence_step"] == 3.0
    assert got["ceiling"] == pytest.approx(1.5) and got["ms_per_decode_step"] == pytest.approx(20.0)
    assert got["acceptance_by_drafter"] == {"suffix": 0.5}
    assert shard_bench.decode_figures(after, after) == {}  # no decode step in the window
