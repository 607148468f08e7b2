"""Build the bundled tiny SPACE model from scratch on CPU (`make tiny-model`).

Stages (each resumable: re-running the script continues from the last checkpoint):
  corpus   Python stdlib sources of this interpreter, held-out split by file
  tokenizer  byte-level BPE, 8192 tokens including <s> </s> <pad> [MASK] (stdlib training split)
  stage1   plain causal pretraining of a ~19M-parameter Llama (GQA), stdlib
  stage2   SAR-SFT continuation from stage 1 (k=5, p_ar=0.5): the model bundled until 2026-11
  twin     AR-only continuation from stage 1, same steps (p_ar=1), for quality retention
  base     AR-only continuation of stage 2 on the larger corpus (stdlib + pinned PyPI packages)
  report   held-out AR loss SPACE vs twin, mask accuracy per offset, model card
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pypi_corpus import PYPI_PACKAGES, pypi_sources

log = logging.getLogger("build_tiny_model")

SEQ_LEN = 512
VOCAB_SIZE = 8192
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "[MASK]"]
HELDOUT_PER_MILLE = 30  # 3% of files, chosen by a hash of the relative path
K = 5
P_AR = 0.5
# 48 blocks x k=5 masks per SAR window (+47% rows): with 4 blocks, 850 steps gave the masks only
# ~34k targets and held-out offset-1 accuracy of about 0.2, far too little for a 19M model.
NUM_MASK_BLOCKS = 48
BATCH_SIZE = 4  # windows of SEQ_LEN per optimizer step (2048 real tokens)
# Step counts calibrated on a 2-core AMX CPU: 1.29 s per step (4 x 512 tokens, bf16 autocast,
# 2 threads, idle machine; an AVX2-only CPU trains in float32, several times slower), plus headroom for other processes sharing the CPU:
# stage 1 ~35 min, the twin ~18 min, stage 2 ~30 min (48 mask blocks add ~47% rows).
STAGE1_STEPS = 1500
STAGE2_STEPS = 850
STAGE1_LR, STAGE2_LR = 1e-3, 3e-4
BASE_STEPS, BASE_LR = 4000, 6e-4
PROGRESS_EVERY_STEPS = 250  # held-out loss / top-1 and throughput in the log
PROGRESS_WINDOWS = 32
SAVE_EVERY_STEPS = 200  # ~5 minutes
EVAL_WINDOWS = 256
SEED = 1234
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|' + m['role'] + '|>\\n' + m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@dataclass
class Stage:
    """One training stage: where it lives, what it starts from, how it trains."""

    name: str
    steps: int
    lr: float
    p_ar: float
    warmup: int
    seed: int


STAGES = {
    "stage1": Stage("stage1", STAGE1_STEPS, STAGE1_LR, 1.0, 100, SEED),
    "stage2": Stage("stage2", STAGE2_STEPS, STAGE2_LR, P_AR, 40, SEED + 1),
    "twin": Stage("twin", STAGE2_STEPS, STAGE2_LR, 1.0, 40, SEED + 1),
    # 4000 steps x 2048 tokens = 8.2M more tokens (about 45 min at 0.67 s per step): with stages 1-2
    # the base has seen 13M tokens, 0.7 per parameter. Chinchilla's 20 per parameter would be 380M
    # tokens, 35 hours of this CPU at this size; a model small enough for 20 per parameter in one
    # session (about 4M parameters, most of them the 8192-row embeddings) is too small to draft code.
    "base": Stage("base", BASE_STEPS, BASE_LR, 1.0, 100, SEED + 2),
}


# ---------------------------------------------------------------- corpus


def is_heldout(relpath: str) -> bool:
    """Deterministic file-level split."""
    return int(hashlib.sha256(relpath.encode()).hexdigest(), 16) % 1000 < HELDOUT_PER_MILLE


def split_by_file(texts: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(train, heldout) by the file-level hash split."""
    train = {rel: t for rel, t in texts.items() if not is_heldout(rel)}
    return train, {rel: t for rel, t in texts.items() if is_heldout(rel)}


def collect_corpus() -> tuple[dict[str, str], dict[str, str], int]:
    """(train, heldout) {relative path: text} of stdlib .py files outside site-packages; plus #non-UTF-8."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, skipped = {}, 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in path.relative_to(root).parts or not path.is_file():
            continue
        try:
            texts[rel] = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            skipped += 1
    train, heldout = split_by_file(texts)
    return train, heldout, skipped


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], out: Path) -> None:
    """Byte-level BPE with the SPACE special tokens, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(out))


def hf_tokenizer(path: Path):
    """The tokenizers file wrapped as a transformers fast tokenizer with specials and chat template."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(path), bos_token="<s>", eos_token="</s>", pad_token="<pad>", mask_token="[MASK]"
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 1024
    return tok


def tokenize_split(tok_path: Path, texts: list[str], out: Path) -> np.ndarray:
    """All documents as one uint16 stream, each as <s> text </s>; cached in `out`."""
    if out.exists():
        return np.load(out)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    stream: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        stream += [bos, *enc.ids, eos]
    arr = np.asarray(stream, dtype=np.uint16)
    np.save(out, arr)
    return arr


def shuffled(items: list) -> list:
    """A fixed permutation (seeded), so that a prefix of held-out windows mixes all sources."""
    order = np.random.default_rng(SEED).permutation(len(items))
    return [items[i] for i in order]


def windows(stream: np.ndarray) -> list:
    """Fixed windows of SEQ_LEN (the last partial one dropped), all tokens supervised."""
    from tgi_space.train.data import Example

    n = len(stream) // SEQ_LEN
    return [Example(stream[i * SEQ_LEN : (i + 1) * SEQ_LEN].tolist(), [True] * SEQ_LEN) for i in range(n)]


# ---------------------------------------------------------------- model and stages


def fresh_model(tok):
    """The bundled architecture: Llama, GQA 6 query / 2 KV heads, untied embeddings (~19M params)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        attn_implementation="sdpa",
    )
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config)


def stage_wall_callback(out: Path, base_seconds: float):
    """A TrainerCallback writing accumulated wall seconds into every checkpoint (survives resumes)."""
    from transformers import TrainerCallback

    class WallClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.t0 = time.time()

        def on_save(self, args, state, control, **kwargs):
            ckpt = out / f"checkpoint-{state.global_step}"
            seconds = base_seconds + time.time() - self.t0
            (ckpt / "wall_seconds.json").write_text(json.dumps({"seconds": seconds}))
            log.info("checkpoint %s (%.0f s of training so far)", ckpt.name, seconds)

    return WallClock()


def progress_callback(heldout: list, tok, path: Path):
    """A TrainerCallback logging held-out AR loss / top-1 and training tokens/s every few hundred steps."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.t0, self.step0 = time.time(), state.global_step

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % PROGRESS_EVERY_STEPS or model is None:
                return
            seconds = time.time() - self.t0
            tokens = (state.global_step - self.step0) * BATCH_SIZE * SEQ_LEN
            row = {"step": state.global_step, "train_tokens_per_s": round(tokens / max(seconds, 1e-9), 1)}
            row.update(heldout_ar(model, heldout, tok))
            log.info("progress %s", json.dumps(row))
            with path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            self.t0, self.step0 = time.time(), state.global_step

    return Progress()


@torch.no_grad()
def heldout_ar(model, examples: list, tok) -> dict:
    """Next-token loss and top-1 accuracy over real tokens of held-out windows (model put back in train mode)."""
    from tgi_space.train.collator import SpaceCollator
    from tgi_space.train.trainer import MetricsAccumulator, model_forward, space_loss

    was_training = model.training
    model.eval()
    collator = SpaceCollator(K, 1.0, 3, tok.pad_token_id, 1, seed=SEED)
    acc = MetricsAccumulator()
    for i in range(0, len(examples), 8):
        batch = collator(examples[i : i + 8])
        acc.add(space_loss(model_forward(model, batch), batch["targets"], batch["offsets"])[1])
    loss_sum, count, correct = acc.sums[0]
    model.train(was_training)
    return {"heldout_ar_loss": round(loss_sum / count, 4), "heldout_top1": round(correct / count, 4)}


def run_stage(
    stage: Stage, init_dir: Path | None, tok, examples: list, work: Path, smoke: bool, heldout: list | None = None
) -> Path:
    """Train one stage (resuming if interrupted); returns the directory of its final model."""
    from transformers import LlamaForCausalLM

    from tgi_space.train.prepare import check_honours_4d_mask, make_space_ready, reset_mask_rows
    from tgi_space.train.trainer import TrainConfig, last_checkpoint, run_training

    out = work / stage.name
    final = out / "final"
    if (final / "stage_info.json").exists():
        log.info("%s already done (%s)", stage.name, final)
        return final
    if init_dir is None:
        model = fresh_model(tok)
    else:
        model = LlamaForCausalLM.from_pretrained(init_dir, dtype=torch.float32, attn_implementation="sdpa")
    mask_id = make_space_ready(model, tok, K)
    if init_dir is not None and stage.p_ar < 1.0:
        reset_mask_rows(model, mask_id)  # [MASK] never seen in stage 1: start from the mean row
    check_honours_4d_mask(model, mask_id)
    steps = 6 if smoke else stage.steps
    cfg = TrainConfig(
        output=str(out),
        k=K,
        p_ar=stage.p_ar,
        num_mask_blocks=NUM_MASK_BLOCKS,
        lr=stage.lr,
        max_steps=steps,
        batch_size=BATCH_SIZE,
        warmup_steps=min(stage.warmup, steps // 2),
        weight_decay=0.1,  # bf16: TrainConfig's default (autocast where the CPU multiplies bf16 natively)
        seed=stage.seed,
        save_steps=3 if smoke else SAVE_EVERY_STEPS,
        logging_steps=1 if smoke else 10,
        extra_args={"max_grad_norm": 1.0, "adam_beta2": 0.95},
    )
    resume = last_checkpoint(str(out))
    base = json.loads((Path(resume) / "wall_seconds.json").read_text())["seconds"] if resume else 0.0
    log.info("%s: %d steps, lr %g, p_ar %.2f, resume from %s", stage.name, steps, stage.lr, stage.p_ar, resume)
    t0 = time.time()
    callbacks = [stage_wall_callback(out, base)]
    if heldout:
        callbacks.append(progress_callback(heldout[:PROGRESS_WINDOWS], tok, out / "progress.jsonl"))
    trainer = run_training(model, examples, cfg, mask_id, tok.pad_token_id, callbacks)
    seconds = base + time.time() - t0
    trainer.model.save_pretrained(final)
    tok.save_pretrained(final)
    info = {
        "steps": steps,
        "lr": stage.lr,
        "p_ar": stage.p_ar,
        "wall_seconds": round(seconds, 1),
        "real_tokens_seen": steps * BATCH_SIZE * SEQ_LEN,
        "expected_mask_tokens_seen": round(steps * BATCH_SIZE * (1 - stage.p_ar) * NUM_MASK_BLOCKS * K),
        "log_history": trainer.state.log_history,
    }
    (final / "stage_info.json").write_text(json.dumps(info, indent=1))
    return final


# ---------------------------------------------------------------- evaluation and card


@torch.no_grad()
def evaluate(model_dir: Path, examples: list, tok) -> dict:
    """Held-out AR loss (real tokens) and mask loss/accuracy per offset, float32."""
    from transformers import LlamaForCausalLM

    from tgi_space.train.collator import SpaceCollator
    from tgi_space.train.trainer import MetricsAccumulator, model_forward, space_loss

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    mask_id = model.config.space_mask_token_id
    collator = SpaceCollator(K, 0.0, mask_id, tok.pad_token_id, NUM_MASK_BLOCKS, seed=SEED)
    acc = MetricsAccumulator()
    for i in range(0, len(examples), 8):
        batch = collator(examples[i : i + 8])
        acc.add(space_loss(model_forward(model, batch), batch["targets"], batch["offsets"])[1])
    summary = acc.summary()
    return {
        "ar_loss": round(summary["ar_loss"], 4),
        "mask_accuracy": {j: round(summary[f"mask_acc_{j}"], 4) for j in range(1, K + 1)},
        "mask_loss": {j: round(summary[f"mask_loss_{j}"], 4) for j in range(1, K + 1)},
    }


def export(final: Path, out: Path, tok) -> int:
    """Save the SPACE model as bfloat16 safetensors with its tokenizer; returns #params."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(final, dtype=torch.float32)
    model = model.to(torch.bfloat16)
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.config.use_cache = True
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    # Readable by transformers 4.x too, and by the server without transformers: template inline.
    tok_config_path = out / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text())
    tok_config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE)
    tok_config_path.write_text(json.dumps(tok_config, indent=2) + "\n")
    return sum(p.numel() for p in model.parameters())


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def render_card(r: dict) -> str:
    """The model card (markdown) from the report's numbers."""
    c, a, t, h, q = r["corpus"], r["architecture"], r["training"], r["heldout"], r["quality_retention"]
    stages = t["stages"]
    stage_rows = "\n".join(
        f"| {name} | {info['steps']} | {info['lr']:g} | {info['p_ar']:g} | {info['real_tokens_seen']:,} "
        f"| {info['expected_mask_tokens_seen']:,} | {_minutes(info['wall_seconds'])} |"
        for name, info in stages.items()
    )
    offset_rows = "\n".join(
        f"| {j} | {h['space']['mask_accuracy'][j]:.3f} | {h['space']['mask_loss'][j]:.3f} "
        f"| {h['twin']['mask_accuracy'][j]:.3f} |"
        for j in h["space"]["mask_accuracy"]
    )
    verdict = (
        "within the +2% budget" if q["within_2_percent"] else "**outside the +2% budget** (reported as measured)"
    )
    total_min = sum(info["wall_seconds"] for info in stages.values()) / 60
    return f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [space, speculative-decoding, llama, code]
---

# tiny-space-py

A {a['num_parameters'] / 1e6:.1f}M-parameter Llama-architecture code model trained from scratch on a
2-core CPU on the Python standard library, then SAR-SFT-tuned (SPACE, arXiv 2402.11809) to fill
`k = {t['k']}` `[MASK]` slots, so that `tgi-space` can draft and verify up to {t['k']} tokens per
forward pass. It exists for demos, tests and benchmarks of this project; it is not a useful code
assistant.

## SPACE settings

`config.json` carries `space_mask_token_id` and `space_k` = {t['k']}; `[MASK]` is a special token of
`tokenizer.json`. The engine reads both; no extra flags are needed.

## Corpus

The `.py` files of the CPython {c['python']} standard library (`sysconfig.get_paths()["stdlib"]`),
excluding `site-packages` and files that are not UTF-8 ({c['skipped_non_utf8_files']} skipped).
Held-out split by file: a file is held out when `sha256(relative path) mod 1000 < {HELDOUT_PER_MILLE}`.

| split | files | tokens |
|---|---|---|
| train | {c['train_files']:,} ({c['train_bytes'] / 1e6:.1f} MB) | {c['train_tokens']:,} |
| held-out | {c['heldout_files']:,} | {c['heldout_tokens']:,} |

## Tokenizer

Byte-level BPE trained with `tokenizers` on the training split: {r['tokenizer']['vocab_size']} tokens
including the specials {', '.join(f'`{x}`' for x in r['tokenizer']['special_tokens'])}. Each document is
`<s> text </s>`; the stream is cut into windows of {t['seq_len']} tokens. `tokenizer_config.json` has a
minimal chat template (`<|role|>` lines).

## Architecture

`LlamaForCausalLM`: hidden {a['hidden_size']}, intermediate {a['intermediate_size']},
{a['num_hidden_layers']} layers, {a['num_attention_heads']} query heads and {a['num_key_value_heads']}
KV heads (grouped-query attention), head_dim {a['head_dim']}, RoPE theta 10000, max positions
{a['max_position_embeddings']}, untied embeddings; {a['num_parameters']:,} parameters stored in bfloat16.

## Training

AdamW (weight decay 0.1, beta2 0.95), cosine schedule with warm-up, bf16 autocast on CPU,
{t['batch_windows']} windows x {t['seq_len']} tokens per step, seed {t['seed']}. SAR-SFT uses the
"appended masks" construction of SPACE.md section 1 with k = {t['k']}, p_ar = {t['p_ar']} and
{t['num_mask_blocks']} mask blocks per SAR example. The AR-only twin continues from the same stage-1
checkpoint for the same steps with p_ar = 1; it is kept under `build/`, not shipped.

| stage | steps | peak lr | p_ar | real tokens | mask tokens (expected) | wall time |
|---|---|---|---|---|---|---|
{stage_rows}

Total training wall time: {total_min:.0f} min on 2 CPU cores (shared with other work at times).

## Held-out results

{h['windows']} held-out windows of {h['tokens_per_window']} tokens, float32 evaluation of the shipped
bfloat16 weights.

Quality retention (next-token loss on real tokens): SPACE model **{q['space_ar_loss']:.4f}** vs
AR-only twin **{q['twin_ar_loss']:.4f}** ({q['relative_change_percent']:+.2f}%), {verdict}.

Mask accuracy by offset (mask j predicts the token j+1 positions after the last visible one; greedy
argmax equals the true token):

| offset | SPACE accuracy | SPACE mask loss | twin accuracy |
|---|---|---|---|
{offset_rows}

## Use

```
tgi-space generate --model models/tiny-space-py --speculate space --max-new-tokens 128 "def fibonacci(n):"
```

It also loads with `transformers.AutoModelForCausalLM` / `AutoTokenizer` as a plain causal LM.

## Rebuild

```
make tiny-model
```

runs `scripts/build_tiny_model.py --out models/tiny-space-py --work build/tiny-model` (about
{total_min:.0f} minutes of training on 2 CPU cores). Every stage checkpoints about every 5 minutes;
re-running the command resumes from the last checkpoint. `training_report.json` holds the numbers of
this card. To SAR-SFT your own model, see `docs/training.md`.
"""


def write_card(report: dict, out: Path) -> None:
    """models/tiny-space-py/README.md and training_report.json from the report."""
    (out / "README.md").write_text(render_card(report))
    (out / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models/tiny-space-py"))
    parser.add_argument("--work", type=Path, default=Path("build/tiny-model"))
    parser.add_argument("--smoke", action="store_true", help="a few steps per stage, to check the pipeline")
    parser.add_argument(
        "--until", choices=["tokenizer", "stage1", "stage2", "base", "twin", "report"], default="base",
        help="base (default) is what make tiny-model ships; twin/report rebuild the previous model's SAR-SFT card",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    train_texts, heldout_texts, non_utf8 = collect_corpus()
    tok_path = args.work / "tokenizer.json"
    if not tok_path.exists():
        train_tokenizer(list(train_texts.values()), tok_path)
    tok = hf_tokenizer(tok_path)
    train_stream = tokenize_split(tok_path, list(train_texts.values()), args.work / "train_ids.npy")
    heldout_stream = tokenize_split(tok_path, list(heldout_texts.values()), args.work / "heldout_ids.npy")
    pypi_train, pypi_heldout = split_by_file(pypi_sources(args.work.parent / "pypi-wheels"))
    full_train = tokenize_split(tok_path, [*train_texts.values(), *pypi_train.values()], args.work / "full_ids.npy")
    full_heldout = tokenize_split(
        tok_path, [*heldout_texts.values(), *pypi_heldout.values()], args.work / "full_heldout_ids.npy"
    )
    corpus = {
        "train_files": len(train_texts),
        "heldout_files": len(heldout_texts),
        "skipped_non_utf8_files": non_utf8,
        "train_bytes": sum(len(t.encode()) for t in train_texts.values()),
        "train_tokens": int(len(train_stream)),
        "heldout_tokens": int(len(heldout_stream)),
        "python": sys.version.split()[0],
        "pypi_packages": list(PYPI_PACKAGES),
        "pypi_train_files": len(pypi_train),
        "pypi_heldout_files": len(pypi_heldout),
        "full_train_tokens": int(len(full_train)),
        "full_heldout_tokens": int(len(full_heldout)),
    }
    log.info("corpus %s (%.0f s)", corpus, time.time() - t0)
    if args.until == "tokenizer":
        return
    train_examples = windows(train_stream)
    stage2_done = (args.work / "stage2" / "final" / "stage_info.json").exists()
    stage1 = None if stage2_done else run_stage(STAGES["stage1"], None, tok, train_examples, args.work, args.smoke)
    if args.until == "stage1":
        return
    stage2 = run_stage(STAGES["stage2"], stage1, tok, train_examples, args.work, args.smoke)
    if args.until == "stage2":
        return
    full_heldout_windows = shuffled(windows(full_heldout))
    base = run_stage(
        STAGES["base"], stage2, tok, windows(full_train), args.work, args.smoke, heldout=full_heldout_windows
    )
    if args.until == "base":
        return
    if stage1 is None:
        raise SystemExit("twin/report need stage 1's checkpoint, which this work dir does not have (stage 2 was seeded)")
    twin = run_stage(STAGES["twin"], stage1, tok, train_examples, args.work, args.smoke)
    if args.until == "twin":
        return
    heldout = windows(heldout_stream)[: 16 if args.smoke else EVAL_WINDOWS]
    num_params = export(stage2, args.out, tok)
    report = build_report(corpus, num_params, [stage1, stage2, twin], heldout, tok, args)
    write_card(report, args.out)
    log.info("report %s", json.dumps({k: report[k] for k in ("heldout", "quality_retention")}))


def build_report(corpus: dict, num_params: int, finals: list[Path], heldout: list, tok, args) -> dict:
    """All numbers of the model card."""
    stage1, stage2, twin = finals
    infos = {name: json.loads((d / "stage_info.json").read_text()) for name, d in zip(STAGES, finals)}
    space_eval = evaluate(args.out, heldout, tok)  # the exported bf16 weights
    export(twin, args.work / "twin-bf16", tok)
    twin_eval = evaluate(args.work / "twin-bf16", heldout, tok)
    ratio = space_eval["ar_loss"] / twin_eval["ar_loss"]
    return {
        "corpus": corpus,
        "tokenizer": {
            "type": "byte-level BPE (tokenizers)", "vocab_size": VOCAB_SIZE, "special_tokens": SPECIAL_TOKENS
        },
        "architecture": {
            "model_type": "llama", "hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 8,
            "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 1024,
            "tie_word_embeddings": False, "num_parameters": num_params, "dtype": "bfloat16",
        },
        "training": {
            "seq_len": SEQ_LEN, "batch_windows": BATCH_SIZE, "k": K, "p_ar": P_AR, "num_mask_blocks": NUM_MASK_BLOCKS,
            "seed": SEED, "smoke": args.smoke,
            "stages": {n: {key: v for key, v in info.items() if key != "log_history"} for n, info in infos.items()},
        },
        "heldout": {"windows": len(heldout), "tokens_per_window": SEQ_LEN, "space": space_eval, "twin": twin_eval},
        "quality_retention": {
            "space_ar_loss": space_eval["ar_loss"],
            "twin_ar_loss": twin_eval["ar_loss"],
            "relative_change_percent": round(100 * (ratio - 1), 2),
            "within_2_percent": bool(ratio <= 1.02),
        },
    }


if __name__ == "__main__":
    main()
