"""Checkpoint folder -> model: built on the meta device, filled from safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from tgi_space.config import CheckpointError, ModelConfig
from tgi_space.model.llama import LlamaForCausalLM

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint (sharded through the index, or all in the folder)."""
    folder = Path(model_dir)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / n for n in names]
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"model_dir: shards listed in the index are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"model_dir: no *.safetensors weights in {model_dir}")
    return files


def load_model(model_dir: str | Path, config: ModelConfig, dtype: str, device: str) -> LlamaForCausalLM:
    """Construct the model without allocating, then materialise and load every parameter."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(TORCH_DTYPES[dtype])
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    loaded = _load_tensors(model, weight_files(model_dir))
    expected = {name for name, _ in model.named_parameters()}
    missing = sorted(expected - loaded)
    if missing:
        raise CheckpointError(f"model_dir: checkpoint lacks weights for {', '.join(missing[:5])}")
    return model.eval()


def _load_tensors(model: LlamaForCausalLM, files: list[Path]) -> set[str]:
    """Copy every checkpoint tensor into its (possibly fused) parameter; names of filled params."""
    params = dict(model.named_parameters())
    filled: set[str] = set()
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                target = _copy_tensor(model, params, name, f.get_tensor(name))
                if target:
                    filled.add(target)
    if model.config.tie_word_embeddings and "embed_tokens.weight" in filled:
        filled.add("lm_head.weight")
    return filled


def _copy_tensor(model: LlamaForCausalLM, params: dict, name: str, tensor: torch.Tensor) -> str | None:
    """Place one checkpoint tensor; returns the parameter name it (partly) filled."""
    name = name.removeprefix("model.")
    if "rotary_emb" in name:
        return None
    parts = name.split(".")
    for ckpt_name, (fused, shard) in model.packed_modules.items():
        if ckpt_name in parts:
            target = name.replace(ckpt_name, fused)
            sizes = model.shard_sizes(fused)
            start = sum(sizes[:shard])
            with torch.no_grad():
                params[target][start : start + sizes[shard]].copy_(tensor)
            return target
    if name not in params:
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            return None
        raise CheckpointError(f"model_dir: unexpected weight {name!r} for {model.config.model_type}")
    with torch.no_grad():
        params[name].copy_(tensor)
    return name
