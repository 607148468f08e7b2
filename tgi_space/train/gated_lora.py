"""Training side of the gated-LoRA SPACE adapter (SPACE.md section 7, docs/adapters.md).

A transformers causal LM is frozen; its chosen projections get LoRA deltas that act only on
rows whose input token is the mask id, and the mask rows' input embedding becomes one trained
vector. `add_gated_lora` wires this into the model; `save_adapter` writes the folder the engine loads.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from tgi_space.model.adapter import (
    ADAPTER_WEIGHTS,
    LORA_PREFIX,
    MASK_EMBEDDING_KEY,
    AdapterConfig,
    AdapterError,
    check_target_modules,
    module_path,
)

MASK_EMBEDDING_PARAM = "space_mask_embedding"  # the trained vector, a parameter of the wrapped model
ADAPTER_FOLDER = "space-adapter"  # where `tgi-space train --adapter gated-lora` saves, inside --output
MASK_TOKEN = "[MASK]"


def find_mask_token(model: Any, tokenizer: Any) -> int:
    """The base's own mask token id: config space_mask_token_id, else the tokenizer's mask token, else [MASK].

    The gated adapter never resizes the vocabulary (the base must stay the base), so a base
    without one is refused.
    """
    vocab = model.get_input_embeddings().weight.shape[0]
    candidates = (getattr(model.config, "space_mask_token_id", None), tokenizer.mask_token_id,
                  tokenizer.get_vocab().get(MASK_TOKEN))
    mask_id = next((int(i) for i in candidates if i is not None), None)
    if mask_id is None:
        raise ValueError(
            "--adapter gated-lora needs a mask token in the base's vocabulary (config.json space_mask_token_id, "
            f"the tokenizer's mask_token, or a {MASK_TOKEN} token) and never adds one: the base must stay unchanged. "
            "Use a base whose tokenizer has one, or a full fine-tune (without --adapter), which adds it"
        )
    if not 0 <= mask_id < vocab:
        raise ValueError(f"mask token id {mask_id} is outside the model's vocabulary [0, {vocab}) "
                         "(its embedding has no row for it; the gated adapter never resizes it)")
    return mask_id


class Gate:
    """Which rows of the current forward are mask rows; shared by the wrapped projections and the embedding."""

    def __init__(self, mask_id: int) -> None:
        self.mask_id = mask_id
        self.rows: torch.Tensor | None = None  # [B, T, 1] bool, set by the model's forward pre-hook each forward

    def set_from(self, input_ids: torch.Tensor | None) -> None:
        """Gate the rows of this forward's input_ids [B, T]."""
        if input_ids is None:
            raise ValueError("a gated-LoRA model needs input_ids (the gate is input_ids == mask id)")
        self.rows = (input_ids == self.mask_id).unsqueeze(-1)


class GatedLoraLinear(nn.Module):
    """A frozen nn.Linear plus `scale * B(A x)` on gated rows only; parameter names as peft's (lora_A, lora_B)."""

    def __init__(self, base: nn.Linear, r: int, alpha: int, gate: Gate) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the base's own parameters: the state-dict names stay the base's
        self.register_parameter("bias", base.bias)
        device = base.weight.device
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=device)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as peft initialises lora_A
        nn.init.zeros_(self.lora_B.weight)  # the adapter starts as a no-op
        self.scale = alpha / r
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base projection of every row; gated rows get the delta added."""
        y = F.linear(x, self.weight, self.bias)
        delta = self.lora_B(self.lora_A(x)) * self.scale
        return torch.where(self.gate.rows, y + delta, y)


def add_gated_lora(model: Any, mask_id: int, r: int, alpha: int, target_modules: tuple[str, ...]) -> Gate:
    """Freeze `model`, wrap its target projections and add the mask embedding (the only trainables)."""
    targets = check_target_modules(target_modules)
    vocab = model.get_input_embeddings().weight.shape[0]
    if not 0 <= mask_id < vocab:
        raise ValueError(f"mask token id {mask_id} is outside the model's vocabulary [0, {vocab})")
    model.requires_grad_(False)
    gate = Gate(mask_id)
    for layer in range(model.config.num_hidden_layers):
        for name in targets:
            _wrap(model, module_path(layer, name), r, alpha, gate)
    embedding = model.get_input_embeddings().weight
    mean = embedding.detach().float().mean(dim=0).to(embedding.dtype)
    model.register_parameter(MASK_EMBEDDING_PARAM, nn.Parameter(mean))
    model.register_forward_pre_hook(partial(_set_gate, gate), with_kwargs=True)
    model.get_input_embeddings().register_forward_hook(partial(_embed_masks, model, gate))
    return gate


def _wrap(model: Any, path: str, r: int, alpha: int, gate: Gate) -> None:
    """Replace the nn.Linear at `path` by its GatedLoraLinear."""
    parent_path, name = path.rsplit(".", 1)
    parent = model.get_submodule(parent_path)
    base = getattr(parent, name, None)
    if not isinstance(base, nn.Linear):
        raise ValueError(f"target_modules: {path} is not an nn.Linear in {type(model).__name__}")
    setattr(parent, name, GatedLoraLinear(base, r, alpha, gate))


def _set_gate(gate: Gate, module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of the model: the gate of this forward's input_ids."""
    gate.set_from(kwargs.get("input_ids", args[0] if args else None))


def _embed_masks(model: Any, gate: Gate, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of the input embedding: mask rows take the trained mask embedding."""
    return torch.where(gate.rows, getattr(model, MASK_EMBEDDING_PARAM).to(output.dtype), output)


def adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """The adapter's tensors under their saved names (docs/adapters.md), float32 on the CPU."""
    state = {MASK_EMBEDDING_KEY: getattr(model, MASK_EMBEDDING_PARAM)}
    for path, module in model.named_modules():
        if isinstance(module, GatedLoraLinear):
            state[f"{LORA_PREFIX}{path}.lora_A.weight"] = module.lora_A.weight
            state[f"{LORA_PREFIX}{path}.lora_B.weight"] = module.lora_B.weight
    return {key: t.detach().float().cpu().contiguous() for key, t in state.items()}


def load_adapter_state(model: Any, folder: str | Path) -> None:
    """Copy a saved adapter's tensors into a model wrapped by `add_gated_lora` (same targets and r)."""
    tensors = load_file(str(Path(folder) / ADAPTER_WEIGHTS))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in tensors.items():
            name = MASK_EMBEDDING_PARAM if key == MASK_EMBEDDING_KEY else key.removeprefix(LORA_PREFIX)
            params[name].copy_(tensor)


INIT_FIELDS = ("r", "lora_alpha", "target_modules", "space_mask_token_id", "base_vocab_size", "base_hidden_size",
               "base_num_hidden_layers")  # what an adapter to start from must share with the one being trained


def start_from(model: Any, folder: str | Path, expected: AdapterConfig) -> None:
    """Load a saved adapter into `model` (wrapped by `add_gated_lora`) to continue training it.

    AdapterError naming the first field of its adapter_config.json that differs from `expected`
    (the run's own settings and base); its k may differ (k only sets how masks are drafted)."""
    saved = AdapterConfig.read(folder)
    for name in INIT_FIELDS:
        if getattr(saved, name) != getattr(expected, name):
            raise AdapterError(f"--init-adapter {folder}: {name} is {getattr(saved, name)!r}, this run's is "
                               f"{getattr(expected, name)!r}")
    load_adapter_state(model, folder)


def adapter_config(model: Any, mask_id: int, k: int, r: int, alpha: int, target_modules: tuple[str, ...],
                   base_name: str) -> AdapterConfig:
    """The adapter_config.json of an adapter trained on `model` (a transformers causal LM)."""
    config = model.config
    return AdapterConfig(
        r=r, lora_alpha=alpha, target_modules=tuple(target_modules), space_mask_token_id=mask_id, space_k=k,
        base_model_name_or_path=base_name, base_vocab_size=model.get_input_embeddings().weight.shape[0],
        base_hidden_size=config.hidden_size, base_num_hidden_layers=config.num_hidden_layers,
    )


def save_adapter(model: Any, config: AdapterConfig, folder: str | Path, metrics: dict | None = None) -> Path:
    """Write adapter_config.json, adapter_model.safetensors (and training_report.json if metrics)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.write(folder)
    save_file(adapter_state(model), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    if metrics is not None:
        (folder / "training_report.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return folder
