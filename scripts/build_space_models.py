"""Second half of `make tiny-model`: SPACE drafters for the base model that build_tiny_model.py trained.

Stages (each resumable; a finished stage is skipped when the command is run again):
  distill           prompts cut from the training stream; the base's own greedy continuations
                    (distilled.jsonl) and the human-written continuations of the same prompts
                    (original.jsonl)
  adapter-distilled gated-LoRA SPACE adapter trained on distilled.jsonl (base frozen)
  adapter-original  the same adapter recipe on original.jsonl, same steps: the self-distillation control
  sar-distilled     the paper's SAR-SFT (full fine-tune, p_ar 0.5) on distilled.jsonl, same steps
  report            held-out AR loss / top-1 (previous bundled model, base, SAR-SFT model), tokens per step
                    of the fixed k=4 layout on HumanEval prompts for every drafter; exports the base with
                    the winning adapter to --out, writes the model card and training_report.json
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("build_space_models")

PROMPT_TOKENS, NEW_TOKENS = 96, 128
NUM_PROMPTS = 2400
DISTILL_BATCH = 48
SEED = 4321
K = 5
NUM_MASK_BLOCKS = 48  # masks are the adapter's only loss: many blocks per example
SEQ_LEN = 256  # 96 prompt + 128 continuation tokens fit
TPS_K, TPS_PROMPTS = 4, 20  # issue 12's measure: fixed layout at k = 4, HumanEval prompts


@dataclass
class Run:
    """One fine-tuning run through `tgi-space train`."""

    name: str
    data: str  # distilled | original
    args: tuple[str, ...]


RUN_STEPS, RUN_BATCH = 600, 8
RUNS = {
    "adapter-distilled": Run("adapter-distilled", "distilled", (
        "--adapter", "gated-lora", "--lora-r", "32", "--lora-alpha", "64", "--lr", "1e-3", "--p-ar", "0")),
    "adapter-original": Run("adapter-original", "original", (
        "--adapter", "gated-lora", "--lora-r", "32", "--lora-alpha", "64", "--lr", "1e-3", "--p-ar", "0")),
    "sar-distilled": Run("sar-distilled", "distilled", ("--lr", "3e-4", "--p-ar", "0.5", "--weight-decay", "0.1")),
}


def cli(*args: str) -> list[str]:
    """The tgi-space command of this interpreter."""
    return [sys.executable, "-m", "tgi_space.cli", *args]


def timed(fn, *args) -> float:
    """Wall seconds of fn(*args)."""
    t0 = time.time()
    fn(*args)
    return round(time.time() - t0, 1)


# ---------------------------------------------------------------- distill


def distill_stage(base: Path, work: Path) -> dict:
    """distilled.jsonl and original.jsonl over the same prompts; returns their sizes and timing."""
    from tgi_space.llm import LLM
    from tgi_space.train.distill import generate_batches, sample_prompts

    done = work / "distill.json"
    if done.exists():
        return json.loads(done.read_text())
    stream = np.load(work.parent / "tiny-model" / "full_ids.npy").tolist()
    windows = sample_prompts([stream], NUM_PROMPTS, PROMPT_TOKENS + NEW_TOKENS, SEED)
    with (work / "original.jsonl").open("w") as f:
        for w in windows:
            f.write(json.dumps({"prompt_ids": w[:PROMPT_TOKENS], "response_ids": w[PROMPT_TOKENS:]}) + "\n")
    t0 = time.time()
    llm = LLM(str(base))
    tokens = generate_batches(llm, [w[:PROMPT_TOKENS] for w in windows], NEW_TOKENS, DISTILL_BATCH,
                              work / "distilled.jsonl")
    info = {"prompts": len(windows), "generated_tokens": tokens, "wall_seconds": round(time.time() - t0, 1)}
    done.write_text(json.dumps(info))
    return info


# ---------------------------------------------------------------- fine-tuning runs


def train_run(run: Run, base: Path, work: Path) -> dict:
    """Run (or resume) one `tgi-space train`; returns its wall time, accumulated over resumes."""
    out = work / run.name
    done = out / "run.json"
    if done.exists():
        return json.loads(done.read_text())
    clock = out / "wall_seconds.txt"
    before = float(clock.read_text()) if clock.exists() else 0.0
    out.mkdir(parents=True, exist_ok=True)
    args = cli(
        "train", "--model", str(base), "--data", str(work / f"{run.data}.jsonl"), "--output", str(out),
        "--k", str(K), "--num-mask-blocks", str(NUM_MASK_BLOCKS), "--max-steps", str(RUN_STEPS),
        "--batch-size", str(RUN_BATCH), "--seq-len", str(SEQ_LEN), "--warmup-steps", "30",
        "--save-steps", "100", "--logging-steps", "10", "--seed", str(SEED), *run.args,
    )
    log.info("%s: %s", run.name, " ".join(args))
    t0 = time.time()
    try:
        subprocess.run(args, check=True)
    finally:
        clock.write_text(str(before + time.time() - t0))
    info = {"steps": RUN_STEPS, "batch": RUN_BATCH, "args": list(run.args), "data": run.data,
            "wall_seconds": round(before + time.time() - t0, 1)}
    done.write_text(json.dumps(info))
    return info


def with_adapter(base_bf16: Path, adapter: Path, out: Path) -> Path:
    """A model folder: the base's files plus `space-adapter/`, named in config.json (the shipped layout)."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(base_bf16, out)
    shutil.copytree(adapter, out / "space-adapter")
    config = json.loads((out / "config.json").read_text())
    config["space_adapter"] = "space-adapter"
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def export_bf16(src: Path, out: Path) -> Path:
    """bf16 safetensors + tokenizer of a trained folder (the bundled format)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).to(torch.bfloat16)
    model.config.use_cache = True
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


# ---------------------------------------------------------------- report


def heldout_windows(work: Path, count: int) -> list:
    """The first `count` held-out windows of the full split, in the fixed shuffled order."""
    sys.path.insert(0, str(Path(__file__).parent))
    from build_tiny_model import shuffled, windows

    return shuffled(windows(np.load(work.parent / "tiny-model" / "full_heldout_ids.npy")))[:count]


def heldout_ar_of(model_dir: Path, examples: list) -> dict:
    """Held-out next-token loss and top-1 of a model folder, float32 transformers forward."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).parent))
    from build_tiny_model import heldout_ar

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    return heldout_ar(model, examples, AutoTokenizer.from_pretrained(model_dir))


def tokens_per_step_of(model_dir: Path) -> dict:
    """Fixed-layout k=4 tokens per step on HumanEval prompts (benchmarks/tokens_per_step.py)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from tokens_per_step import tokens_per_step

    from tgi_space.bench import humaneval_prompts

    return tokens_per_step(str(model_dir), TPS_K, humaneval_prompts(TPS_PROMPTS), 128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=Path("build/tiny-model/base/final"))
    parser.add_argument("--previous", type=Path, default=None, help="the previously bundled model, for the report")
    parser.add_argument("--work", type=Path, default=Path("build/space-models"))
    parser.add_argument("--out", type=Path, default=Path("models/tiny-space-py"))
    parser.add_argument("--until", choices=["distill", *RUNS, "report"], default="report")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    base_bf16 = args.work / "base-bf16"
    if not (base_bf16 / "config.json").exists():
        export_bf16(args.base, base_bf16)
    stages = {"distill": distill_stage(base_bf16, args.work)}
    if args.until == "distill":
        return
    for name, run in RUNS.items():
        stages[name] = train_run(run, base_bf16, args.work)
        if args.until == name:
            return
    report = build_report(args, base_bf16, stages)
    (args.work / "report.json").write_text(json.dumps(report, indent=1))
    log.info("report %s", json.dumps(report))


def build_report(args, base_bf16: Path, stages: dict) -> dict:
    """Every number of the card; exports the winning adapter with the base to --out."""
    heldout = heldout_windows(args.work, 256)
    sar = export_bf16(args.work / "sar-distilled", args.work / "sar-distilled-bf16")
    models = {name: with_adapter(base_bf16, args.work / name / "space-adapter", args.work / f"{name}-model")
              for name in RUNS if name.startswith("adapter")}
    models["sar-distilled"] = sar
    if args.previous:
        models["previous"] = args.previous
    tps = {name: tokens_per_step_of(path) for name, path in models.items()}
    quality = {"base (= base + adapter, bit for bit)": heldout_ar_of(base_bf16, heldout),
               "sar-distilled": heldout_ar_of(sar, heldout)}
    if args.previous:
        quality["previous"] = heldout_ar_of(args.previous, heldout)
    return {"stages": stages, "tokens_per_step_k4": tps, "heldout": quality, "heldout_windows": len(heldout)}


if __name__ == "__main__":
    main()
