"""Shard server benchmark through the router emulation: every speculation setting vs plain, per concurrency.

One `text-generation-server` process per setting starts with the launcher's argv and environment:
plain (SPECULATE_MODE=none), the paper's fixed layout at k = 3 and 5 (TGI_SPACE_FIXED_LAYOUT=1,
--speculate k), the planned step with masks and suffix drafts, masks only and suffix only, and SDSAT
(TGI_SPACE_SPECULATE_MODE=sdsat: governed like the planned step, its greedy verify passes with suffix drafts
too; sdsat-adaptive without them, TGI_SPACE_DRAFTERS=masks; sdsat-forced adds TGI_SPACE_FIXED_LAYOUT=1,
which runs its passes every step, adaptive tokens only). With --temperature > 0 every request samples (nucleus, --top-p). For each
concurrency c, all serve the same max(N, waves * c) HumanEval prompts (greedy, EOS ignored, so all generate the
same tokens), after an untimed warm-up of c of them. Concurrency c means c clients, each sending its next
request when its previous one has ended (--arrivals clients, the default), or every request queued at the start
with at most c in flight (--arrivals backlog). Each request generates M tokens, or, with --length-spread s, M * (1 + s * u)
for u spread evenly over [-1, 1]: with equal lengths, requests started together finish together, and plain
decoding's batches stay in step (their replacements are prefilled together, in one large prefill), while any
speculation lets them drift apart; real traffic is never in step. Queued requests join a running batch as TGI's
router lets them (--admission tgi, the default: when floor(1.2 x running) wait, or 20 steps after the last
admission, so replacements of requests that finish apart are still prefilled together); --admission eager
prefills each at the next step, as the emulation did before. With --chunking on (the shard's default,
PREFILL_CHUNKING=1) the shard reports support_chunking and the router ignores that backpressure: queued requests
join the running batch's next step in the same forward (Prefill with cached_batch), every step, as TGI 3 does.
The settings run back to back, in an order that rotates between concurrencies, so slow drift on a shared
machine does not favour one. Reported per setting: requests/s, generated tokens/s, tokens per
Generation, and the ratio to plain; with --repeats, the median repetition of each, and the median of each
repetition's ratio to plain's run of the same repetition (`ratio_paired`). The setting none-control is a second
plain shard: its ratio is the noise floor of the run.

    python benchmarks/shard_bench.py --model models/tiny-space-py --requests 64 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: tests.router_emulation must import
    sys.path.insert(0, str(ROOT))

from tests.http_server import free_port  # noqa: E402
from tests.router_emulation import TGI_ADMISSION, EmuRequest, ShardProcess  # noqa: E402
from tgi_space.bench import humaneval_prompts  # noqa: E402

MODES = {  # name -> (extra environment, extra argv)
    "none": ({"SPECULATE_MODE": "none"}, ()),
    # a second plain shard, run like every other setting: its ratio to "none" is the run's noise floor (what
    # the same code measures against itself on this machine), so a ratio inside that band says nothing
    "none-control": ({"SPECULATE_MODE": "none"}, ()),
    "fixed-k3": ({"TGI_SPACE_FIXED_LAYOUT": "1"}, ("--speculate", "3")),
    "fixed-k5": ({"TGI_SPACE_FIXED_LAYOUT": "1"}, ("--speculate", "5")),
    "planned-hybrid": ({}, ()),
    "planned-hybrid-no-datastore": ({"TGI_SPACE_DATASTORE": "none"}, ()),  # without the model's datastore
    "planned-hybrid-survival": ({"TGI_SPACE_SURVIVAL_CALIBRATION": "1"}, ()),  # nodes valued at calibrated reach
    "planned-masks": ({"TGI_SPACE_DRAFTERS": "masks"}, ()),
    "planned-suffix": ({"TGI_SPACE_DRAFTERS": "suffix"}, ()),
    "sdsat": ({"TGI_SPACE_SPECULATE_MODE": "sdsat"}, ()),  # governed: plain steps while its passes lose
    "sdsat-adaptive": ({"TGI_SPACE_SPECULATE_MODE": "sdsat", "TGI_SPACE_DRAFTERS": "masks"}, ()),  # no suffix drafts
    "sdsat-forced": ({"TGI_SPACE_SPECULATE_MODE": "sdsat", "TGI_SPACE_FIXED_LAYOUT": "1"}, ()),  # every step
    # without prefill chunking whatever --chunking says: the router's backpressure (--admission) decides when
    # new requests join; side by side with the chunked settings, their ratio to plain is what chunking is worth
    "none-unchunked": ({"SPECULATE_MODE": "none", "PREFILL_CHUNKING": "0"}, ()),
    "planned-hybrid-unchunked": ({"PREFILL_CHUNKING": "0"}, ()),
    # prefix caching on whatever --prefix-caching says: beside plain decoding without it (the default), what
    # reusing ended prompts' blocks is worth to plain decoding and to the planned step
    "none-prefix-cached": ({"SPECULATE_MODE": "none", "TGI_SPACE_PREFIX_CACHING": "1"}, ()),
    "planned-hybrid-prefix-cached": ({"TGI_SPACE_PREFIX_CACHING": "1"}, ()),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The CLI: model folder, requests per (mode, concurrency), tokens per request, and limits."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model folder (config.json, tokenizer.json, *.safetensors)")
    p.add_argument("--requests", type=int, default=64, help="requests per mode and concurrency (at least)")
    p.add_argument("--waves", type=int, default=0,
                   help="at least this many requests per in-flight slot: max(--requests, waves * c) at concurrency c")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--concurrency", default="1,2,4,8,16,32,64", help="comma-separated in-flight request limits")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated settings to run (none is always run)")
    p.add_argument("--length-spread", type=float, default=0.0,
                   help="0: every request generates --max-new-tokens (they finish together when started together); "
                        "s in (0, 1): request i generates round(M * (1 + s * u_i)), u_i spread evenly over [-1, 1]")
    p.add_argument("--arrivals", choices=("clients", "backlog"), default="clients",
                   help="clients: concurrency c is c clients in a closed loop, each sending its next request when "
                        "its previous one ends; backlog: every request is queued at the start and the router keeps "
                        "at most c in flight (the router then always has a long queue)")
    p.add_argument("--admission", choices=("tgi", "eager"), default="tgi",
                   help="tgi: the router's backpressure at the launcher's defaults (waiting_served_ratio 1.2, "
                        "max_waiting_tokens 20): queued requests join a running batch when enough wait or after "
                        "20 steps; eager: each joins at the next step (not what TGI does)")
    p.add_argument("--chunking", choices=("on", "off"), default="on",
                   help="the shards' PREFILL_CHUNKING: on, new requests join the running batch's next step (TGI 3's "
                        "router with Info.support_chunking; --admission then only matters without it)")
    p.add_argument("--prefix-caching", choices=("on", "off"), default="off",
                   help="the shards' TGI_SPACE_PREFIX_CACHING (the shard's own default is on; off here so that runs "
                        "compare with earlier ones): on, the router keeps ended prompts' full blocks and a request "
                        "whose prompt starts alike reads them (cache_len) instead of computing them")
    p.add_argument("--shared-prefix", action="store_true",
                   help="every prompt starts with the same preamble (the Zen of Python as comments, 289 tokens for the bundled tokenizer), "
                        "as a served system prompt would: what prefix caching finds on every request")
    p.add_argument("--max-input-tokens", type=int, default=512, help="router truncation of the prompts")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0, help="> 0: nucleus sampling (with --top-p)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=1, help="runs per setting and concurrency; the median is kept")
    p.add_argument("--out", default=str(Path(__file__).with_name("shard_bench.json")))
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.modes = ["none"] + [m for m in args.modes.split(",") if m and m != "none"]
    if not 0 <= args.length_spread < 1:
        p.error(f"--length-spread must be in [0, 1), got {args.length_spread}")
    args.longest = new_tokens(args, 0) if args.length_spread == 0 else round(args.max_new_tokens * (1 + args.length_spread))
    context = json.loads((Path(args.model) / "config.json").read_text()).get("max_position_embeddings")
    if context and args.max_input_tokens + args.longest > context:  # Warmup would refuse it
        args.max_input_tokens = context - args.longest
        print(f"--max-input-tokens lowered to {args.max_input_tokens} (context {context})", file=sys.stderr)
    return args


def new_tokens(args: argparse.Namespace, i: int) -> int:
    """Tokens request i generates: --max-new-tokens, or spread around it (a fixed, evenly spread sequence: the
    golden-ratio points of [-1, 1]), so requests started together finish apart, as real traffic does."""
    u = 2 * ((i * 0.6180339887498949) % 1.0) - 1
    return max(1, round(args.max_new_tokens * (1 + args.length_spread * u)))


def kv_cache_bytes(model_dir: Path, tokens: int) -> int:
    """Bytes of KV for `tokens` positions at float32 (an upper bound for bf16/fp16 shards)."""
    config = json.loads((model_dir / "config.json").read_text())
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return 2 * config["num_hidden_layers"] * config.get("num_key_value_heads", heads) * head_dim * 4 * tokens


def start_shards(args: argparse.Namespace, socket_dir: Path) -> dict[str, ShardProcess]:
    """Both shards, started together; the cache holds max(concurrency) full requests plus slack."""
    model = Path(args.model)
    per_request = args.max_input_tokens + args.longest + 8 + 2 * args.block_size
    env = {"TGI_SPACE_KV_CACHE_BYTES": str(kv_cache_bytes(model, per_request * (max(args.concurrency) + 2))),
           "TGI_SPACE_BLOCK_SIZE": str(args.block_size), "MAX_BATCH_SIZE": str(max(args.concurrency)),
           "PREFILL_CHUNKING": "1" if args.chunking == "on" else "0",
           "TGI_SPACE_PREFIX_CACHING": "1" if args.prefix_caching == "on" else "0"}
    shards = {}
    for mode in args.modes:
        port = free_port()  # each shard exports its decode totals (TGI_SPACE_METRICS_PORT): `decode_figures`
        metrics = {"TGI_SPACE_METRICS_PORT": str(port), "TGI_SPACE_METRICS_HOST": "127.0.0.1"}
        shards[mode] = ShardProcess(model, socket_dir / mode, MODES[mode][1], {**env, **MODES[mode][0], **metrics})
    for shard in shards.values():
        shard.wait_ready()
    return shards


def scrape(port: int) -> dict[str, float]:
    """The shard's Prometheus samples, by name and labels (`name{k="v"}`)."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def decode_figures(before: dict[str, float], after: dict[str, float]) -> dict:
    """The decode steps between two scrapes: rows and tokens per step, and the ceiling, the speed over plain
    decoding that the tokens emitted allow at the measured latency curve's cost of the rows sent (Python and
    everything else free): (tokens / t(rows sent)) / (sequences / t(one row each)), summed over the steps."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    steps, seqs = d.get("tgi_space_decode_steps_total", 0.0), d.get("tgi_space_decode_sequences_total", 0.0)
    if not steps:
        return {}
    tokens, rows = d["tgi_space_decode_tokens_total"], d["tgi_space_decode_rows_total"]
    sent, plain = (d.get(f'tgi_space_decode_curve_seconds_total{{rows="{k}"}}', 0.0) for k in ("sent", "plain"))
    accepted = {k.split('"')[1]: v for k, v in d.items() if k.startswith("tgi_space_drafter_accepted_total")}
    drafted = {k.split('"')[1]: v for k, v in d.items() if k.startswith("tgi_space_drafter_drafted_total")}
    return {"decode_steps": int(steps), "mean_batch": seqs / steps, "rows_per_step": rows / steps,
            "rows_per_sequence": rows / seqs, "tokens_per_sequence_step": tokens / seqs,
            "ceiling": (tokens / sent) / (seqs / plain) if sent and plain else None,
            "ms_per_decode_step": 1000 * d["tgi_space_decode_seconds_total"] / steps,
            "acceptance_by_drafter": {k: accepted.get(k, 0.0) / v for k, v in sorted(drafted.items()) if v}}


def run_once(shard: ShardProcess, prompts: list[str], args: argparse.Namespace, concurrency: int) -> dict:
    """Serve every prompt with at most `concurrency` in flight; throughput and steps of this run."""
    limits = dict(max_input_tokens=args.max_input_tokens, max_total_tokens=args.max_input_tokens + args.longest,
                  max_prefill_tokens=2 * args.max_input_tokens, max_batch_size=concurrency,
                  **(TGI_ADMISSION if args.admission == "tgi" else {}))
    emu = shard.router(**limits)  # start-up and Warmup are outside the timing
    requests = [EmuRequest(p, max_new_tokens=new_tokens(args, i), ignore_eos=True, parameters=sampling(args, i))
                for i, p in enumerate(prompts)]
    # Untimed warm-up at this concurrency: oneDNN builds a kernel for each new row count on first use
    # (about 1 ms each), and the planner learns its correction factors; a server pays both once.
    emu.run(clients=concurrency if args.arrivals == "clients" else None, requests=[EmuRequest(p, max_new_tokens=new_tokens(args, i), ignore_eos=True, parameters=sampling(args, i))
             for i, p in enumerate(prompts[:concurrency])])
    emu.calls, emu.call_seconds = [], {}  # counted from here (before 2026-12-07 the calls included the warm-up)
    before = scrape(shard.metrics_port)
    start = time.perf_counter()
    results = emu.run(requests, clients=concurrency if args.arrivals == "clients" else None)
    seconds = time.perf_counter() - start
    figures = decode_figures(before, scrape(shard.metrics_port))
    emu.close()
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    tokens = sum(len(r.token_ids) for r in results)
    generations = sum(len(r.tokens_per_generation) for r in results)
    return {"seconds": seconds, "requests_per_s": len(results) / seconds, "tokens_per_s": tokens / seconds,
            "generated_tokens": tokens, "decode_calls": emu.calls.count("Decode"),
            "prefill_calls": emu.calls.count("Prefill"), "decode_seconds": emu.call_seconds.get("Decode", 0.0),
            "prefill_seconds": emu.call_seconds.get("Prefill", 0.0), "tokens_per_generation": tokens / generations,
            "speculate": emu.info.speculate, **figures, "outputs": [r.token_ids for r in results]}


def sampling(args: argparse.Namespace, i: int) -> dict:
    """NextTokenChooserParameters of request i: greedy, or nucleus with a per-request seed."""
    if args.temperature <= 0:
        return {}
    return {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "seed": 1000 + i}


def bench(args: argparse.Namespace) -> dict:
    """Every concurrency, both modes back to back (order alternating); ratios SPACE / none."""
    pool = humaneval_prompts(min(max(args.requests, args.waves * max(args.concurrency)), 164))
    if args.shared_prefix:
        pool = [shared_preamble() + p for p in pool]
    report = {"model": args.model, "requests": args.requests, "waves": args.waves, "max_new_tokens": args.max_new_tokens,
              "length_spread": args.length_spread, "arrivals": args.arrivals, "admission": args.admission,
              "chunking": args.chunking, "prefix_caching": args.prefix_caching, "shared_prefix": args.shared_prefix,
              "max_input_tokens": args.max_input_tokens, "temperature": args.temperature, "top_p": args.top_p,
              "by_concurrency": {}}
    with tempfile.TemporaryDirectory() as socket_dir:
        shards = start_shards(args, Path(socket_dir))
        try:
            for i, c in enumerate(args.concurrency):
                prompts = requests_at(pool, args, c)
                reps: dict[str, list[dict]] = {mode: [] for mode in args.modes}
                for rep in range(args.repeats):  # the order rotates between concurrencies and repetitions
                    k = (i + rep) % len(args.modes)
                    order = args.modes[k:] + args.modes[:k]
                    for mode in order:
                        reps[mode].append(run_once(shards[mode], prompts, args, c))
                runs = {mode: {**median_run(r), **paired_ratios(r, reps["none"])} for mode, r in reps.items()}
                row = summarize(runs, order, greedy=args.temperature <= 0)
                report["by_concurrency"][str(c)] = {"max_in_flight": min(c, len(prompts)), "requests": len(prompts), **row}
                print_row(c, report["by_concurrency"][str(c)])
        finally:
            for shard in shards.values():
                shard.stop()
    return report


def shared_preamble() -> str:
    """The Zen of Python (the standard library's `this` module) as comment lines: a fixed preamble, not HumanEval."""
    import codecs  # noqa: PLC0415
    import contextlib  # noqa: PLC0415
    import io  # noqa: PLC0415

    with contextlib.redirect_stdout(io.StringIO()):
        import this  # noqa: PLC0415  (prints the text on import)
    return "".join(f"# {line}\n" for line in codecs.decode(this.s, "rot13").splitlines()) + "\n"


def requests_at(pool: list[str], args: argparse.Namespace, c: int) -> list[str]:
    """The prompts served at concurrency c: max(--requests, waves * c), cycling through the pool. With few
    requests per slot a run at high concurrency is a few hundred steps, mostly the planner's start-up."""
    n = max(args.requests, args.waves * c)
    return [pool[i % len(pool)] for i in range(n)]


def median_run(runs: list[dict]) -> dict:
    """The repetition with the median tokens/s (its other figures with it), and every repetition's tokens/s."""
    ranked = sorted(runs, key=lambda r: r["tokens_per_s"])
    return {**ranked[(len(ranked) - 1) // 2], "tokens_per_s_all": [r["tokens_per_s"] for r in runs]}


def paired_ratios(runs: list[dict], plain: list[dict]) -> dict:
    """Each repetition's tokens/s over plain decoding's in the same repetition (run minutes apart at most,
    so slow drift of a shared machine cancels), and their median: `ratio_paired`."""
    ratios = [r["tokens_per_s"] / p["tokens_per_s"] for r, p in zip(runs, plain)]
    return {"ratios_by_repeat": ratios, "ratio_paired": statistics.median(ratios)}


def summarize(runs: dict[str, dict], order: list[str], greedy: bool = True) -> dict:
    """Drop the outputs, keep whether each setting agreed with plain token for token (greedy is lossless;
    sampled outputs are equal in distribution only, so they are not compared)."""
    plain = runs["none"]
    outputs = {mode: run.pop("outputs") for mode, run in runs.items()}
    for mode, run in runs.items():
        run["identical_to_none"] = outputs[mode] == outputs["none"] if greedy else None
        run["ratio_tokens_per_s"] = run["tokens_per_s"] / plain["tokens_per_s"]
    return {"order": order, **runs}


def print_row(c: int, row: dict) -> None:
    cells = [f"{m} {r['tokens_per_s']:7.1f} tok/s {r['ratio_tokens_per_s']:.2f}x (paired {r['ratio_paired']:.2f}x) "
             f"{r['tokens_per_generation']:.2f}/gen {r.get('rows_per_sequence', 0):.2f} rows/seq"
             + (f" ceiling {r['ceiling']:.2f}x" if r.get("ceiling") else "")
             + ("" if r["identical_to_none"] is not False else " OUTPUTS DIFFER")
             for m, r in row.items() if isinstance(r, dict)]
    print(f"c={c:>3}  " + " | ".join(cells), flush=True)


def plot(report: dict, path: Path) -> None:
    """By concurrency, one line per setting: the paired ratio to plain decoding (dashed: the ceiling the measured
    latency curve allows, where reported), tokens per Generation, and query rows per sequence-step."""
    import matplotlib  # noqa: PLC0415  (the bench extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = report["by_concurrency"]
    cs = sorted(rows, key=int)
    xs = [int(c) for c in cs]
    modes = [m for m in rows[cs[0]] if isinstance(rows[cs[0]][m], dict) and m != "none"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 4.5))
    for mode in modes:
        line, = ax1.plot(xs, [rows[c][mode]["ratio_paired"] for c in cs], marker="o", label=mode)
        ceiling = [rows[c][mode].get("ceiling") for c in cs]
        if any(ceiling):
            ax1.plot(xs, [v if v else float("nan") for v in ceiling], ls="--", color=line.get_color(), lw=0.9)
        ax2.plot(xs, [rows[c][mode]["tokens_per_generation"] for c in cs], marker="o", label=mode)
        if "rows_per_sequence" in rows[cs[0]][mode]:
            ax3.plot(xs, [rows[c][mode].get("rows_per_sequence", float("nan")) for c in cs], marker="o", label=mode)
    for y, style in ((1.0, "-"), (0.95, ":")):
        ax1.axhline(y, color="grey", ls=style, lw=0.8)
    sampling = f"T = {report['temperature']:g}, top-p {report['top_p']:g}" if report["temperature"] > 0 else "greedy"
    ax1.set(xscale="log", xlabel="concurrency", ylabel="tokens/s over plain decoding's (paired, median)",
            title=f"through the shard, {report['max_new_tokens']} new tokens, {sampling}\n(dashed: ceiling from the latency curve)")
    ax2.set(xscale="log", xlabel="concurrency", ylabel="tokens per Generation", title="tokens per Generation")
    ax3.set(xscale="log", xlabel="concurrency", ylabel="query rows per sequence-step", title="rows per sequence in decode steps")
    for ax in (ax1, ax2, ax3):
        ax.set_xticks(xs, cs)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = bench(args)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    try:
        plot(report, Path(args.out).with_suffix(".png"))
    except ImportError:  # matplotlib comes with the bench extra
        print("matplotlib is not installed: no plot")


if __name__ == "__main__":
    main()
