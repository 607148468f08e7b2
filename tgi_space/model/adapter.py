"""Gated-LoRA SPACE adapters (docs/adapters.md): LoRA deltas and a mask embedding that act on mask rows only.

The base stays as it is. On a row whose input token is the adapter's mask id, the embedding is the
adapter's `mask_embedding` and every adapted projection adds `scale * B(A x)`; every other row
computes exactly what the base computes. The folder layout is defined here once, for the trainer
(tgi_space/train/gated_lora.py) that writes it and the engine that reads it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from tgi_space.config import CheckpointError, ModelConfig
from tgi_space.model.prepack import narrowest_exact

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_TYPE = "GATED_LORA"
GATE = "input_ids == space_mask_token_id"
MASK_EMBEDDING_KEY = "mask_embedding"
LORA_PREFIX = "base_model.model."  # peft's prefix before the transformers module path
BLOCKS = {  # transformers projection name -> the decoder-layer block that holds it
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
TARGET_MODULES = tuple(BLOCKS)


class AdapterError(CheckpointError):
    """A gated adapter folder that does not fit the base model (names the field that does not match)."""


def module_path(layer: int, name: str) -> str:
    """transformers' path of projection `name` in decoder layer `layer`: model.layers.{i}.{block}.{name}."""
    return f"model.layers.{layer}.{BLOCKS[name]}.{name}"


def lora_key(layer: int, name: str, which: str) -> str:
    """The safetensors key of lora_A or lora_B (`which`) of one projection, in peft's naming."""
    return f"{LORA_PREFIX}{module_path(layer, name)}.lora_{which}.weight"


def check_target_modules(names: Any) -> tuple[str, ...]:
    """The target modules as a tuple; ValueError naming any unknown one."""
    names = tuple(names)
    unknown = [n for n in names if n not in BLOCKS]
    if not names or unknown:
        raise AdapterError(f"target_modules: unknown {unknown or 'empty list'}; allowed: {', '.join(TARGET_MODULES)}")
    return names


@dataclass(frozen=True)
class AdapterConfig:
    """adapter_config.json: what was adapted, the mask token, and the base it was trained on."""

    r: int
    lora_alpha: int
    target_modules: tuple[str, ...]
    space_mask_token_id: int
    space_k: int
    base_model_name_or_path: str
    base_vocab_size: int
    base_hidden_size: int
    base_num_hidden_layers: int
    peft_type: str = PEFT_TYPE
    gate: str = GATE

    def __post_init__(self) -> None:
        if self.peft_type != PEFT_TYPE:
            raise AdapterError(f"adapter_config.json: peft_type must be {PEFT_TYPE!r}, got {self.peft_type!r}")
        if self.gate != GATE:
            raise AdapterError(f"adapter_config.json: gate must be {GATE!r}, got {self.gate!r}")
        object.__setattr__(self, "target_modules", check_target_modules(self.target_modules))
        for name in ("r", "space_k"):
            if getattr(self, name) < 1:
                raise AdapterError(f"adapter_config.json: {name} must be >= 1, got {getattr(self, name)}")

    @property
    def scale(self) -> float:
        """LoRA's scaling of B(A x): lora_alpha / r."""
        return self.lora_alpha / self.r

    @classmethod
    def read(cls, folder: str | Path) -> "AdapterConfig":
        """Parse `folder/adapter_config.json`; AdapterError naming a missing field."""
        path = Path(folder) / ADAPTER_CONFIG
        if not path.is_file():
            raise AdapterError(f"adapter: no {ADAPTER_CONFIG} in {folder}")
        raw = json.loads(path.read_text())
        fields = {f.name for f in dataclasses.fields(cls)}
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [name for name in required if raw.get(name) is None]
        if missing:
            raise AdapterError(f"{ADAPTER_CONFIG}: missing {', '.join(missing)}")
        return cls(**{name: value for name, value in raw.items() if name in fields})

    def write(self, folder: str | Path) -> None:
        """Write `folder/adapter_config.json`."""
        raw = {**dataclasses.asdict(self), "target_modules": list(self.target_modules)}
        (Path(folder) / ADAPTER_CONFIG).write_text(json.dumps(raw, indent=2) + "\n")

    def check_base(self, base: ModelConfig) -> None:
        """AdapterError naming the first field in which the base model differs from the adapter's."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers"):
            if getattr(self, f"base_{name}") != getattr(base, name):
                raise AdapterError(
                    f"{ADAPTER_CONFIG}: base_{name} {getattr(self, f'base_{name}')} does not match the model's "
                    f"{name} {getattr(base, name)} (the adapter was trained on {self.base_model_name_or_path!r})"
                )
        if not 0 <= self.space_mask_token_id < base.vocab_size:
            raise AdapterError(f"{ADAPTER_CONFIG}: space_mask_token_id {self.space_mask_token_id} is outside "
                               f"the vocabulary [0, {base.vocab_size})")

    def apply_to(self, base: ModelConfig) -> ModelConfig:
        """The base's config with this adapter's SPACE mask token and k (SPACE-trained masks)."""
        return dataclasses.replace(base, space_mask_token_id=self.space_mask_token_id, space_k=self.space_k,
                                   space_method=None, adaptive_token_ids=())


def adapter_dir(model_dir: str | Path, explicit: str | None, config: ModelConfig) -> Path | None:
    """The adapter folder to load: `explicit`, else config.json's `space_adapter` (relative to the model)."""
    if explicit:
        folder, field = Path(explicit), "adapter"
    elif config.space_adapter:
        folder, field = Path(model_dir) / config.space_adapter, "config.json space_adapter"
    else:
        return None
    if not folder.is_dir():
        raise AdapterError(f"{field}: no such folder {folder}")
    return folder


class GatedDelta(nn.Module):
    """The delta of one engine projection (fused or not): B(A x), scale folded into B.

    A: [S*r, in] the stacked lora_A of its S adapted shards; B: [out, S*r] block-diagonal, each
    shard's lora_B in its output rows and its own r columns (zero rows for shards not adapted).
    Computed in float32 whatever the model's dtype: a few rows through two thin GEMMs cost 3-4x less
    in float32 than in oneDNN's bf16 on CPU, and mask rows never reach verification. Kept as bf16 when
    bf16 holds A and B exactly (an adapter saved in bf16, a power-of-two scale): the same float32
    values once widened, half the bytes a step streams (prepack.narrowest_exact).
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor, spans: list[tuple[int, int, int, int]] | None = None) -> None:
        super().__init__()
        a, bt = a.float(), b.t().float().contiguous()  # B transposed, [S*r, out]: the fused kernel reads its rows
        narrow_a, narrow_bt = narrowest_exact(a), narrowest_exact(bt)
        if narrow_a.dtype == narrow_bt.dtype:
            a, bt = narrow_a, narrow_bt
        self.register_buffer("a", a)
        self.register_buffer("bt", bt)
        spans = spans if spans is not None else [(0, a.shape[0], 0, b.shape[0])]
        self.register_buffer("spans", torch.tensor(spans, dtype=torch.long).reshape(-1, 4))  # B's nonzero blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Delta rows [n, out] of input rows x [n, in]."""
        return F.linear(F.linear(x.float(), self.a.float()), self.bt.t().float())

    def add_to(self, y: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, kernels=None) -> None:
        """y[rows] += delta(x[rows]) rounded to y's dtype, in place; one fused call when `kernels` (the
        fused CPU kernels, attention/fused.py) are given (the same float32 math, only B's blocks read)."""
        if kernels is not None and y.device.type == "cpu" and y.stride(-1) == 1 and x.stride(-1) == 1:
            kernels.lora_delta_(y, x, rows, self.a, self.bt, self.spans)
        else:
            y.index_add_(0, rows, self(x[rows]).to(y.dtype))


@dataclass
class MaskGate:
    """One step's mask rows and the deltas they get; built once per forward by `GatedLora.open_gate`."""

    rows: torch.Tensor  # [n] flat rows of the step whose input token is the mask id (n >= 1)
    deltas: dict[nn.Module, GatedDelta]  # engine projection -> its delta


class GatedLora(nn.Module):
    """A loaded adapter, attached as `model.adapter`: the mask embedding and one delta per adapted projection."""

    def __init__(
        self, config: AdapterConfig, mask_embedding: torch.Tensor, deltas: dict[nn.Module, GatedDelta]
    ) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("mask_embedding", mask_embedding)  # [hidden], model dtype
        self.delta_modules = nn.ModuleList(deltas.values())  # registered, so .to() moves them
        self.deltas = deltas

    def open_gate(
        self, input_ids: torch.Tensor, x: torch.Tensor, rows: torch.Tensor | None = None
    ) -> MaskGate | None:
        """Put the mask embedding on the mask rows of x [N, hidden] (in place); None when the step has none.

        `rows`: the step's mask-group rows as the layout knows them; without it, rows holding the mask id.
        """
        if rows is None:
            rows = (input_ids == self.config.space_mask_token_id).nonzero().squeeze(1)  # [n]
        if rows.numel() == 0:
            return None
        x[rows] = self.mask_embedding
        return MaskGate(rows, self.deltas)


def load_adapter(folder: str | Path, model: nn.Module) -> GatedLora:
    """Read an adapter folder and build its deltas for `model` (our LlamaForCausalLM), in the model's dtype."""
    config = AdapterConfig.read(folder)
    config.check_base(model.config)
    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise AdapterError(f"adapter: no {ADAPTER_WEIGHTS} in {folder}")
    tensors = load_file(str(path))
    _check_keys(tensors, config)
    like = model.embed_tokens.weight
    embedding = tensors[MASK_EMBEDDING_KEY]
    if tuple(embedding.shape) != (model.config.hidden_size,):
        raise AdapterError(f"{ADAPTER_WEIGHTS}: {MASK_EMBEDDING_KEY} has shape {list(embedding.shape)}, "
                           f"expected [{model.config.hidden_size}] (hidden_size)")
    targets = _fused_targets(model, config.target_modules)
    deltas = {}
    for i, layer in enumerate(model.layers):
        for fused, names in targets.items():
            module = getattr(getattr(layer, BLOCKS[names[0]]), fused)
            deltas[module] = _fused_delta(model, module, fused, names, i, tensors, config).to(like.device)
    return GatedLora(config, embedding.to(like.device, like.dtype), deltas)


def _check_keys(tensors: dict[str, torch.Tensor], config: AdapterConfig) -> None:
    """AdapterError naming a missing or unexpected tensor."""
    expected = {MASK_EMBEDDING_KEY} | {
        lora_key(i, name, which)
        for i in range(config.base_num_hidden_layers) for name in config.target_modules for which in "AB"
    }
    missing, unexpected = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
    if missing:
        raise AdapterError(f"{ADAPTER_WEIGHTS}: missing {', '.join(missing[:3])} (target_modules "
                           f"{list(config.target_modules)})")
    if unexpected:
        raise AdapterError(f"{ADAPTER_WEIGHTS}: unexpected {', '.join(unexpected[:3])} (not in target_modules "
                           f"{list(config.target_modules)})")


def _fused_targets(model: nn.Module, names: tuple[str, ...]) -> dict[str, list[str]]:
    """Engine projection -> the adapted checkpoint projections packed into it, in packing order."""
    out: dict[str, list[str]] = {}
    for name in sorted(names, key=lambda n: model.packed_modules.get(n, (n, 0))[1]):
        fused = model.packed_modules.get(name, (name, 0))[0]
        out.setdefault(fused, []).append(name)
    return out


def _fused_delta(model: nn.Module, module: nn.Linear, fused: str, names: list[str], layer: int,
                 tensors: dict[str, torch.Tensor], config: AdapterConfig) -> GatedDelta:
    """The GatedDelta of one engine projection from its shards' lora_A / lora_B (shapes checked)."""
    r = config.r
    sizes = model.shard_sizes(fused) if names[0] in model.packed_modules else [module.out_features]
    a = torch.empty(len(names) * r, module.in_features)
    b = torch.zeros(module.out_features, len(names) * r)
    spans = []
    for j, name in enumerate(names):
        shard = model.packed_modules.get(name, (fused, 0))[1]
        start = sum(sizes[:shard])
        a[j * r : (j + 1) * r] = _lora_tensor(tensors, layer, name, "A", (r, module.in_features))
        rows = slice(start, start + sizes[shard])
        b[rows, j * r : (j + 1) * r] = _lora_tensor(tensors, layer, name, "B", (sizes[shard], r))
        spans.append((j * r, (j + 1) * r, start, start + sizes[shard]))
    return GatedDelta(a, b * config.scale, spans)


def _lora_tensor(
    tensors: dict[str, torch.Tensor], layer: int, name: str, which: str, shape: tuple[int, int]
) -> torch.Tensor:
    """One lora_A / lora_B as float32, AdapterError when its shape does not fit the base projection."""
    key = lora_key(layer, name, which)
    tensor = tensors[key]
    if tuple(tensor.shape) != shape:
        what = "(r, in_features)" if which == "A" else "(out_features, r)"
        raise AdapterError(f"{ADAPTER_WEIGHTS}: {key} has shape {list(tensor.shape)}, expected {list(shape)} "
                           f"{what} of the base's {name}")
    return tensor.float()
