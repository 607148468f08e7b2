"""The user-facing recipe: a Hugging Face causal LM + data files -> a SPACE-ready checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from tgi_space.config import TRAINING_METHODS
from tgi_space.model.adapter import AdapterConfig
from tgi_space.train.data import Example, SkipCounter, check_data_paths, load_examples
from tgi_space.train.gated_lora import (
    ADAPTER_FOLDER,
    adapter_config,
    add_gated_lora,
    find_mask_token,
    save_adapter,
    start_from,
)
from tgi_space.train.prepare import check_honours_4d_mask, make_space_ready, unused_token_id
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
    method: str = "space",
    reuse_token_ids: bool = False,
) -> Path:
    """SAR-SFT `model_path` on `data`; saves the SPACE-ready model and tokenizer in `cfg.output`.

    method: "space" or "sdsat" (the same SAR-SFT data: both train a mask at p, whose real context ends at
    p - 1, to predict the token at p + 1); recorded as config.json space_method. reuse_token_ids: use a
    vocabulary row no training example contains (and not special) as the mask token instead of a new row.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_data_paths(data)  # before minutes of model loading
    if cfg.init_adapter:
        AdapterConfig.read(cfg.init_adapter)  # a folder that is not an adapter fails before the data is read
    if method not in TRAINING_METHODS:
        raise ValueError(f"--method must be one of {', '.join(TRAINING_METHODS)}, got {method!r}")
    if cfg.is_gated and (method != "space" or reuse_token_ids):
        raise ValueError("--adapter gated-lora trains SPACE masks on the base's own mask token: "
                         "--method sdsat and --reuse-token-ids do not apply")
    check_seq_len(model_path, seq_len, cfg.k)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.float32, attn_implementation=attn_implementation
    )
    skips = SkipCounter()
    examples = load_examples(data, tokenizer, seq_len, cfg.k, skips)  # before the mask token exists
    if cfg.is_gated:
        return finetune_adapter(model, tokenizer, examples, cfg, model_path, skips)
    token_id = None
    if reuse_token_ids:
        token_id = unused_token_id(tokenizer, examples, model.get_input_embeddings().weight.shape[0])
        if token_id is None:
            log.warning("--reuse-token-ids: every vocabulary row occurs in the data; adding a new [MASK] row")
    mask_id = make_space_ready(model, tokenizer, cfg.k, method, token_id)
    check_honours_4d_mask(model, mask_id)
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


def finetune_adapter(model: Any, tokenizer: Any, examples: list[Example], cfg: TrainConfig, model_path: str,
                     skips: SkipCounter) -> Path:
    """Train a gated SPACE adapter on the frozen `model` (mask rows only); saves it to output/space-adapter."""
    mask_id = find_mask_token(model, tokenizer)
    add_gated_lora(model, mask_id, cfg.lora_r, cfg.lora_alpha, cfg.target_modules)
    config = adapter_config(model, mask_id, cfg.k, cfg.lora_r, cfg.lora_alpha, cfg.target_modules, model_path)
    if cfg.init_adapter:
        start_from(model, cfg.init_adapter, config)
        log.info("gated adapter starts from %s", cfg.init_adapter)
    check_honours_4d_mask(model, mask_id)
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    trainer = run_training(model, examples, cfg, mask_id, pad_id)
    log.info("data: %d examples used; %s", len(examples), skips.report())
    folder = Path(cfg.output) / ADAPTER_FOLDER
    if trainer.is_world_process_zero():
        save_adapter(trainer.accelerator.unwrap_model(trainer.model), config, folder, mask_metrics(trainer))
    return folder


def mask_metrics(trainer: Any) -> dict:
    """training_report.json of an adapter run: steps, and the logged per-offset mask loss and accuracy."""
    logged = [entry for entry in trainer.state.log_history if any(key.startswith("mask_") for key in entry)]
    return {"global_step": trainer.state.global_step, "final": logged[-1] if logged else {}, "log_history": logged}
