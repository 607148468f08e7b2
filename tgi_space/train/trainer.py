"""SAR-SFT training on transformers' `Trainer`: explicit targets, AR and per-offset mask metrics."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from tgi_space.model.adapter import TARGET_MODULES, check_target_modules
from tgi_space.train.collator import IGNORE, SpaceCollator
from tgi_space.train.data import Example

log = logging.getLogger(__name__)

ADAPTERS = ("gated-lora",)  # --adapter: the base stays frozen (docs/adapters.md)


@dataclass
class TrainConfig:
    """Hyper-parameters of one SAR-SFT run (the CLI is built from this)."""

    output: str
    k: int = 5
    p_ar: float | None = None  # None: 0.5, or 0 with the gated adapter (its AR rows carry no loss)
    num_mask_blocks: int = 4
    lr: float = 5e-5
    epochs: float = 2.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 4  # per device
    grad_accum: int = 1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    bf16: bool | None = None  # bf16 autocast; None: where the hardware multiplies bf16 natively (`fast_bf16`)
    seed: int = 0
    save_steps: int = 500
    save_total_limit: int = 2
    logging_steps: int = 10
    resume: bool = True  # continue from the last checkpoint in `output` if there is one
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    adapter: str | None = None  # "gated-lora": train only a gated SPACE adapter, saved to output/space-adapter
    target_modules: tuple[str, ...] = TARGET_MODULES  # projections the gated adapter adapts
    init_adapter: str | None = None  # gated adapter folder to start from (same r, alpha, targets) instead of zeros
    disable_tqdm: bool = False
    extra_args: dict[str, Any] = field(default_factory=dict)  # passed to TrainingArguments (fsdp, deepspeed, ...)

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        self._check_adapter()
        if not 0.0 <= self.p_ar <= 1.0:
            raise ValueError(f"p_ar must be in [0, 1], got {self.p_ar}")
        for name in ("num_mask_blocks", "batch_size", "grad_accum", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ValueError("set max_steps > 0 or epochs > 0")
        if self.bf16 is None:
            self.bf16 = fast_bf16()

    @property
    def is_gated(self) -> bool:
        """Whether this run trains a gated SPACE adapter (mask rows only) instead of the model."""
        return self.adapter == "gated-lora"

    def _check_adapter(self) -> None:
        """Resolve p_ar, check the adapter settings."""
        if self.adapter is not None and self.adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {', '.join(ADAPTERS)}, got {self.adapter!r}")
        if self.p_ar is None:
            self.p_ar = 0.0 if self.is_gated else 0.5
        if self.init_adapter is not None and not self.is_gated:
            raise ValueError("init_adapter needs adapter='gated-lora' (it continues training a gated adapter)")
        if not self.is_gated:
            return
        if self.lora:
            raise ValueError("lora and adapter='gated-lora' are exclusive: the gated adapter is already LoRA")
        if self.p_ar != 0.0:
            raise ValueError(f"p_ar must be 0 with adapter='gated-lora' (AR rows are the base's: no loss), "
                             f"got {self.p_ar}")
        if self.lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, got {self.lora_r}")
        self.target_modules = check_target_modules(self.target_modules)


def fast_bf16() -> bool:
    """Whether bf16 autocast speeds training up here: a CUDA GPU with bf16, or a CPU whose oneDNN has native
    bf16 GEMMs (AMX, AVX512-BF16). Elsewhere torch runs bf16 GEMMs in a reference loop: measured on an
    AVX2-only CPU (AMD EPYC, 2 threads), a gated-adapter step of the bundled model (8 x 256 tokens, 48 mask
    blocks) took 111 s with bf16 autocast against 6.3 s in float32."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    from tgi_space.model.prepack import native_bf16_gemm

    return native_bf16_gemm()


class ExampleDataset(Dataset):
    """A list of `Example`s as a map-style dataset."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


def space_loss(logits: torch.Tensor, targets: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Mean CE over supervised positions, plus summed statistics by offset (0 = real token).

    logits: [B, T, V]; targets, offsets: [B, T]. Stats map offset -> (loss_sum, count, correct).
    """
    flat_logits = logits.float().reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    token_loss = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE, reduction="none")
    supervised = flat_targets != IGNORE
    loss = token_loss.sum() / supervised.sum().clamp(min=1)
    with torch.no_grad():
        correct = (flat_logits.argmax(-1) == flat_targets) & supervised
        flat_offsets = offsets.reshape(-1)
        stats = {}
        for off in flat_offsets[supervised].unique().tolist():
            sel = supervised & (flat_offsets == off)
            stats[int(off)] = (token_loss[sel].sum().item(), int(sel.sum()), int(correct[sel].sum()))
    return loss, stats


class MetricsAccumulator:
    """Running sums of loss/count/correct per offset between two log lines."""

    def __init__(self) -> None:
        self.sums: dict[int, list[float]] = defaultdict(lambda: [0.0, 0, 0])

    def add(self, stats: dict) -> None:
        """Add the stats of one micro-batch."""
        for off, (loss_sum, count, correct) in stats.items():
            acc = self.sums[off]
            acc[0], acc[1], acc[2] = acc[0] + loss_sum, acc[1] + count, acc[2] + correct

    def summary(self) -> dict[str, float]:
        """ar_loss, and mask_loss_j / mask_acc_j for each offset j seen."""
        out = {}
        for off, (loss_sum, count, correct) in sorted(self.sums.items()):
            if count == 0:
                continue
            if off == 0:
                out["ar_loss"] = loss_sum / count
            else:
                out[f"mask_loss_{off}"] = loss_sum / count
                out[f"mask_acc_{off}"] = correct / count
        return out

    def reset(self) -> None:
        """Start a new logging window."""
        self.sums.clear()


def model_forward(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits [B, T, V] for a collated batch (4D mask and explicit positions)."""
    return model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
    ).logits


class SpaceTrainer(Trainer):
    """Trainer whose loss uses explicit targets and which logs AR and per-offset mask metrics."""

    def __init__(self, *args: Any, mask_only: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mask_only = mask_only  # loss on mask rows only (gated adapter: real rows are the frozen base's)
        self.model_accepts_loss_kwargs = False  # our loss is a per-micro-batch mean: let Trainer scale for GA
        self.loss_is_scaled_for_ga = False
        self.metrics = MetricsAccumulator()

    def compute_loss(self, model: Any, inputs: dict, return_outputs: bool = False, num_items_in_batch: Any = None):
        """CE on the collator's explicit targets (no shift inside the model)."""
        logits = model_forward(model, inputs)
        targets = inputs["targets"]
        if self.mask_only:
            targets = targets.masked_fill(inputs["offsets"] == 0, IGNORE)
        loss, stats = space_loss(logits, targets, inputs["offsets"])
        if model.training:
            self.metrics.add(stats)
        return (loss, logits) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the accumulated AR / mask metrics to each training log line."""
        if "loss" in logs:
            logs.update({name: round(v, 4) for name, v in self.metrics.summary().items()})
            self.metrics.reset()
        super().log(logs, *args, **kwargs)


def training_arguments(cfg: TrainConfig) -> TrainingArguments:
    """TrainingArguments for a config: cosine schedule with warm-up, checkpoints, mixed precision."""
    return TrainingArguments(
        output_dir=cfg.output,
        learning_rate=cfg.lr,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        bf16=cfg.bf16,
        use_cpu=not torch.cuda.is_available(),  # bf16 autocast on CPU needs this set explicitly
        seed=cfg.seed,
        data_seed=cfg.seed,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=cfg.disable_tqdm,
        **cfg.extra_args,
    )


def wrap_lora(model: Any, cfg: TrainConfig, mask_id: int) -> Any:
    """LoRA adapters on all linear layers; the [MASK] embedding rows stay trainable."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules="all-linear",
        trainable_token_indices=[mask_id],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.print_trainable_parameters()
    return model


def last_checkpoint(output: str) -> str | None:
    """The newest `checkpoint-*` directory in `output`, if any."""
    return get_last_checkpoint(output) if Path(output).is_dir() else None


def run_training(
    model: Any, examples: Sequence[Example], cfg: TrainConfig, mask_id: int, pad_id: int, callbacks: list | None = None
) -> SpaceTrainer:
    """Train `model` on `examples` (resuming from the last checkpoint if asked); returns the trainer."""
    args = training_arguments(cfg)
    # each process draws its own p_ar coins and mask starts
    collator = SpaceCollator(cfg.k, cfg.p_ar, mask_id, pad_id, cfg.num_mask_blocks, seed=cfg.seed + args.process_index)
    trainer = SpaceTrainer(
        model=model, args=args, train_dataset=ExampleDataset(examples), data_collator=collator, callbacks=callbacks,
        mask_only=cfg.is_gated,
    )
    trainer.add_callback(ScheduleResync())
    resume = last_checkpoint(cfg.output) if cfg.resume else None
    if resume:
        log.info("resuming from %s", resume)
    steps = optimizer_steps(len(examples), cfg, args.world_size)
    log.info("training %d examples for %d optimizer steps (k=%d, p_ar=%.2f)", len(examples), steps, cfg.k, cfg.p_ar)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def optimizer_steps(num_examples: int, cfg: TrainConfig, world_size: int = 1) -> int:
    """Optimizer steps of the run, counted as the Trainer counts them (partial batches and GA windows count)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    batches = math.ceil(math.ceil(num_examples / world_size) / cfg.batch_size)  # per process, last batch partial
    per_epoch = max(batches // cfg.grad_accum + int(batches % cfg.grad_accum > 0), 1)
    return math.ceil(cfg.epochs * per_epoch)


class ScheduleResync(TrainerCallback):
    """After resuming, put the learning rate where the *current* schedule has it.

    The checkpoint restores the optimizer's and the scheduler's last learning rate; when the run was
    resumed with a larger --max-steps, that is the end of the old cosine (0), and the first step
    would train at 0 and log 0. The schedule's function already knows the new length: apply it.
    """

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        lambdas = getattr(lr_scheduler, "lr_lambdas", None)
        if optimizer is None or not lambdas or state.global_step == 0:
            return
        step = lr_scheduler.last_epoch
        lrs = [base * fn(step) for base, fn in zip(lr_scheduler.base_lrs, lambdas)]
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        lr_scheduler._last_lr = lrs
