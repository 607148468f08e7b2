"""`tgi-space bench-engine`: the engine's own speed, against transformers and the hardware floor.

Reported, in one run: the forward latency t(N) for N = 1..64 query rows at several
cache lengths, fp32 and bf16, for our engine and for a plain transformers forward
of the same checkpoint (with a DynamicCache of the same length); plain greedy
decoding tokens/s at batch 1 against transformers `generate()` in the same dtype
(methods interleaved per repetition, medians); and the weight-streaming floor,
model bytes / measured memory bandwidth, which no batch-1 decoder can beat.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import typer

from tgi_space.bench import hf_runner, humaneval_prompts, latency_curve, load_hf
from tgi_space.config import SpacePolicy
from tgi_space.llm import LLM
from tgi_space.sampling import SamplingParams

CURVE_ROWS = (1, 2, 4, 8, 12, 16, 24, 32, 36, 48, 64)


def memory_bandwidth(num_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of reading a buffer far larger than the caches (median of `repeats` sums)."""
    buf = torch.ones(num_bytes // 4, dtype=torch.float32)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t0)
    return num_bytes / statistics.median(times)


def model_bytes(llm: LLM) -> int:
    """Bytes of every weight a decoding step reads (embedding excluded: one row per token)."""
    model = llm.engine.model
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total - model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()


@torch.inference_mode()
def hf_latency_curve(hf, context: int, rows: tuple[int, ...], repeats: int) -> dict[int, float]:
    """transformers forward latency (ms) of n new tokens after a DynamicCache of `context` tokens."""
    from transformers import DynamicCache

    cache = DynamicCache()
    hf(torch.full((1, context), 5), past_key_values=cache, use_cache=True)
    curve = {}
    for n in rows:
        ids = torch.full((1, n), 5)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            hf(ids, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - t0)
            cache.crop(-n)  # drop the n new tokens again
        curve[n] = 1000 * statistics.median(times)
    return curve


def ours_latency_curve(llm: LLM, context: int, rows: tuple[int, ...], repeats: int) -> dict[int, float]:
    full = latency_curve(llm, context, max(rows), repeats)
    return {n: full[n] for n in rows}


def decode_speed(llm: LLM, hf, prompts: list[list[int]], max_new_tokens: int, repeats: int) -> dict:
    """Plain greedy decoding, batch 1, ours vs transformers generate(), interleaved; tokens/s medians."""
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    hf_run = hf_runner(hf, max_new_tokens, None)
    rates: dict[str, list[float]] = {"engine": [], "hf-generate": []}
    same = 0
    for _ in range(repeats):
        elapsed = {"engine": 0.0, "hf-generate": 0.0}
        for ids in prompts:
            t0 = time.perf_counter()
            ours = llm.generate([ids], params, speculate="none")[0].token_ids
            elapsed["engine"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            theirs = hf_run(ids)[0]
            elapsed["hf-generate"] += time.perf_counter() - t0
            same += ours == theirs
        for name in rates:
            rates[name].append(len(prompts) * max_new_tokens / elapsed[name])
    out = {name: statistics.median(r) for name, r in rates.items()}
    out["ratio"] = out["engine"] / out["hf-generate"]
    out["identical_outputs"] = f"{same}/{len(prompts) * repeats}"
    return out


def plot(report: dict, path: Path) -> None:
    """t(N) per dtype and cache length, ours solid and transformers dashed, the floor dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(report["dtypes"])
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.5), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        r = report["dtypes"][dtype]
        for context, curve in r["ours_ms"].items():
            line = ax.plot([int(n) for n in curve], list(curve.values()), marker=".", label=f"ours, {context} cached")
            hf = r["transformers_ms"][context]
            ax.plot([int(n) for n in hf], list(hf.values()), ls="--", color=line[0].get_color(),
                    label=f"transformers, {context} cached")
        ax.axhline(r["floor_ms"], ls=":", color="grey", label="weight-streaming floor")
        ax.set(xlabel="query rows per forward (N)", ylabel="t(N), ms", title=f"{dtype}, {report['threads']} threads")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def bench_engine(
    model: str = typer.Option("models/tiny-space-py", "--model", "-m"),
    out: Path = typer.Option(Path("benchmarks"), "--out"),
    dtypes: str = typer.Option("bfloat16,float32", "--dtypes"),
    contexts: str = typer.Option("64,256,768", "--contexts", help="Cache lengths for t(N)."),
    num_prompts: int = typer.Option(8, "--num-prompts"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
    repeats: int = typer.Option(3, "--repeats"),
    curve_repeats: int = typer.Option(15, "--curve-repeats"),
    threads: int = typer.Option(2, "--threads"),
) -> None:
    """Latency curves, plain decoding vs transformers, and the floor; JSON + PNG under --out."""
    torch.set_num_threads(threads)
    bandwidth = memory_bandwidth()
    report = {"model": model, "threads": threads, "memory_bandwidth_gb_s": bandwidth / 1e9, "dtypes": {},
              "torch": torch.__version__}
    for dtype in dtypes.split(","):
        llm = LLM(model, dtype=dtype, space=SpacePolicy(k_max=0), prefix_caching=False)  # prompts repeat
        hf = load_hf(model, llm.engine.dtype)
        prompts = [llm.tokenizer.encode(p) for p in humaneval_prompts(num_prompts)]
        ctx = [int(c) for c in contexts.split(",")]
        report["dtypes"][dtype] = {
            "floor_ms": 1000 * model_bytes(llm) / bandwidth,
            "ours_ms": {c: ours_latency_curve(llm, c, CURVE_ROWS, curve_repeats) for c in ctx},
            "transformers_ms": {c: hf_latency_curve(hf, c, CURVE_ROWS, curve_repeats) for c in ctx},
            "decode_batch1": decode_speed(llm, hf, prompts, max_new_tokens, repeats),
        }
        del llm, hf
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine_cpu.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "engine_cpu.png")
    _print(report)


def _print(report: dict) -> None:
    typer.echo(f"memory bandwidth {report['memory_bandwidth_gb_s']:.1f} GB/s, {report['threads']} threads")
    for dtype, r in report["dtypes"].items():
        d = r["decode_batch1"]
        typer.echo(f"[{dtype}] floor {r['floor_ms']:.2f} ms/token; plain decoding batch 1: ours {d['engine']:.1f} "
                   f"tok/s, transformers generate() {d['hf-generate']:.1f} tok/s, ratio {d['ratio']:.2f}x, "
                   f"identical {d['identical_outputs']}")
        for context, curve in r["ours_ms"].items():
            hf = r["transformers_ms"][context]
            cells = "  ".join(f"{n}:{curve[n]:.1f}/{hf[n]:.1f}" for n in curve)
            typer.echo(f"  t(N) ms ours/transformers at {context} cached: {cells}")
            typer.echo(f"    t(16)/t(1) {curve[16] / curve[1]:.2f}, t(36)/t(1) {curve[36] / curve[1]:.2f}")


def register(app: typer.Typer) -> None:
    """Add the `bench-engine` command."""
    app.command("bench-engine")(bench_engine)
