"""`tgi-space train`: SAR-SFT a Hugging Face causal LM into a SPACE model (transformers imported lazily)."""

from __future__ import annotations

import logging
from typing import List, Optional

import typer

from tgi_space.model.adapter import TARGET_MODULES


def train(
    model: str = typer.Option(..., "--model", help="Hugging Face model directory or hub id"),
    data: List[str] = typer.Option(
        ..., "--data", help="text/code files, directories, or JSONL (prompt/response or messages); repeatable"
    ),
    output: str = typer.Option(..., "--output", help="where checkpoints and the final model go"),
    k: int = typer.Option(5, "--k", help="masks per block (= most candidates verified per step)"),
    method: str = typer.Option("space", "--method", help="space | sdsat: the decoder the checkpoint is for (same "
                               "SAR-SFT data; recorded as config.json space_method)"),
    reuse_token_ids: bool = typer.Option(False, "--reuse-token-ids/--no-reuse-token-ids",
                                         help="use a vocabulary row the data never contains (not special) as the "
                                              "mask/adaptive token instead of adding a row"),
    p_ar: Optional[float] = typer.Option(
        None, "--p-ar", help="probability of a plain causal-LM example (default 0.5; 0 with --adapter gated-lora)"
    ),
    num_mask_blocks: int = typer.Option(
        4, "--num-mask-blocks", help="mask blocks appended per SAR example (--adapter gated-lora: use many, e.g. 32-48)"
    ),
    lr: float = typer.Option(5e-5, "--lr"),
    epochs: float = typer.Option(2.0, "--epochs"),
    max_steps: int = typer.Option(-1, "--max-steps", help="> 0 overrides --epochs"),
    batch_size: int = typer.Option(4, "--batch-size", help="per device"),
    grad_accum: int = typer.Option(1, "--grad-accum"),
    seq_len: int = typer.Option(1024, "--seq-len"),
    warmup_steps: int = typer.Option(0, "--warmup-steps"),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    bf16: Optional[bool] = typer.Option(
        None, "--bf16/--no-bf16", help="bf16 autocast (default: on where the hardware multiplies bf16 natively: "
                                       "CUDA GPUs with bf16, CPUs with AMX or AVX512-BF16; float32 elsewhere)"
    ),
    lora: bool = typer.Option(False, "--lora/--no-lora", help="LoRA instead of a full fine-tune (merged on save)"),
    lora_r: int = typer.Option(16, "--lora-r"),
    lora_alpha: int = typer.Option(32, "--lora-alpha"),
    adapter: Optional[str] = typer.Option(
        None, "--adapter", help="gated-lora: freeze the model, train a gated SPACE adapter (docs/adapters.md)"
    ),
    target_modules: str = typer.Option(
        ",".join(TARGET_MODULES), "--target-modules", help="projections the gated adapter adapts (comma list)"
    ),
    init_adapter: Optional[str] = typer.Option(
        None, "--init-adapter", help="--adapter gated-lora: start from this adapter folder (same --lora-r, "
                                     "--lora-alpha, --target-modules and base) instead of a no-op adapter"
    ),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="continue from the last checkpoint in --output"),
    save_steps: int = typer.Option(500, "--save-steps"),
    logging_steps: int = typer.Option(10, "--logging-steps"),
    seed: int = typer.Option(0, "--seed"),
    attn_implementation: str = typer.Option("sdpa", "--attn-implementation", help="sdpa or eager (honour 4D masks)"),
    fsdp: Optional[str] = typer.Option(None, "--fsdp", help="passed to TrainingArguments.fsdp"),
    deepspeed: Optional[str] = typer.Option(None, "--deepspeed", help="DeepSpeed config JSON path"),
) -> None:
    """SAR-SFT: teach a causal LM to fill [MASK] slots (SPACE.md section 1)."""
    from tgi_space.train.data import DataError
    from tgi_space.train.prepare import MaskNotHonouredError
    from tgi_space.train.trainer import TrainConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    extra = {key: v for key, v in (("fsdp", fsdp), ("deepspeed", deepspeed)) if v}
    try:
        cfg = TrainConfig(
            output=output, k=k, p_ar=p_ar, num_mask_blocks=num_mask_blocks, lr=lr, epochs=epochs,
            max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, warmup_steps=warmup_steps,
            weight_decay=weight_decay, bf16=bf16, seed=seed, save_steps=save_steps, logging_steps=logging_steps,
            resume=resume, lora=lora, lora_r=lora_r, lora_alpha=lora_alpha, extra_args=extra, adapter=adapter,
            target_modules=tuple(m.strip() for m in target_modules.split(",") if m.strip()),
            init_adapter=init_adapter,
        )
        from tgi_space.train.finetune import finetune

        out = finetune(model, data, cfg, seq_len=seq_len, attn_implementation=attn_implementation, method=method,
                       reuse_token_ids=reuse_token_ids)
    except (ValueError, DataError, MaskNotHonouredError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from err
    if adapter:
        typer.echo(f"SPACE adapter saved to {out} (serve the base with --adapter {out}, docs/adapters.md)")
    else:
        typer.echo(f"SPACE model saved to {out}")


def register(app: typer.Typer) -> None:
    """Add the `train` command to the tgi-space CLI."""
    app.command("train")(train)
