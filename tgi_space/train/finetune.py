"""The user-facing recipe: a Hugging Face causal LM + data files -> a SPACE-ready checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from tgi_space.train.data import SkipCounter, check_data_paths, load_examples
from tgi_space.train.prepare import check_honours_4d_mask, make_space_ready
from tgi_space.train.trainer import TrainConfig, run_training, wrap_lora

log = logging.getLogger(__name__)


def check_seq_len(model_path: str, seq_len: int, k: int) -> None:
    """A SAR window uses positions up to seq_len + k - 2 (a mask block after its last token): all must exist."""
    from transformers import AutoConfig

    if seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2, got {seq_len}")
    limit = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
    if limit is not None and seq_len + k - 1 > limit:
        raise ValueError(
            f"--seq-len {seq_len} needs positions up to {seq_len + k - 2} (with k={k} masks after the last token), "
            f"but the model has {limit} (max_position_embeddings); use --seq-len {limit - k + 1} or less"
        )


def finetune(
    model_path: str,
    data: Sequence[str],
    cfg: TrainConfig,
    seq_len: int = 1024,
    attn_implementation: str = "sdpa",
) -> Path:
    """SAR-SFT `model_path` on `data`; saves the SPACE-ready model and tokenizer in `cfg.output`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_data_paths(data)  # before minutes of model loading
    check_seq_len(model_path, seq_len, cfg.k)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.float32, attn_implementation=attn_implementation
    )
    mask_id = make_space_ready(model, tokenizer, cfg.k)
    check_honours_4d_mask(model, mask_id)
    skips = SkipCounter()
    examples = load_examples(data, tokenizer, seq_len, cfg.k, skips)
    if cfg.lora:
        model = wrap_lora(model, cfg, mask_id)
    trainer = run_training(model, examples, cfg, mask_id, tokenizer.pad_token_id)
    log.info("data: %d examples used; %s", len(examples), skips.report())
    output = Path(cfg.output)
    if cfg.lora:
        if trainer.is_world_process_zero():
            trainer.accelerator.unwrap_model(trainer.model).merge_and_unload().save_pretrained(output)
    else:
        trainer.save_model(str(output))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(output)
    return output
