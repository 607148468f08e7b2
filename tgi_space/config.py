"""Configuration dataclasses: the model as read from a checkpoint, and the engine."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_CHOICES = ("auto", *DTYPES)  # auto: resolve_dtype
ATTENTION_BACKENDS = ("auto", "fused", "matmul", "sdpa", "flash")
SPECULATE_MODES = ("space", "sdsat", "none")  # a request's, or a server's, way to decode
SPECULATION_METHODS = ("space", "sdsat")  # SpacePolicy.speculate_mode: what a speculating request runs
TRAINING_METHODS = ("space", "sdsat")  # config.json space_method: recipes whose masks mean the same thing
MAX_TREE_DEPTH = 32  # with k <= 16, a step holds at most 48 rows past a sequence's leading chain
DRAFTERS = ("masks", "suffix")
SDSAT_TREE_SIZES = (4, 8, 8, 5, 3)  # SDSAT's reference nucleus tree: nodes per depth


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be served (missing files, unsupported model)."""


def _rope_settings(raw: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(rope_theta, scaling dict) from either transformers 4.x or 5.x config layout."""
    params = dict(raw.get("rope_parameters") or {})
    legacy = raw.get("rope_scaling") or {}
    theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    scaling = {**legacy, **params}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    scaling["rope_type"] = rope_type
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"config.json: rope_scaling type {rope_type!r} is not supported; "
            f"allowed: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return theta, scaling


def parse_tree_sizes(raw: str) -> tuple[int, ...]:
    """"4,8,8,5,3" -> (4, 8, 8, 5, 3) (SDSAT's draws per depth); a bad entry is a ValueError naming the setting."""
    try:
        return tuple(int(n) for n in raw.split(",") if n.strip())
    except ValueError:
        raise ValueError(f"sdsat_tree_sizes must be integers like 4,8,8,5,3, got {raw!r}") from None


def _as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family checkpoint (Llama 2/3, Mistral, Qwen2)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any]
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    space_mask_token_id: int | None = None
    space_k: int | None = None
    space_method: str | None = None  # recipe that trained the mask token ("space", "sdsat"); None: SPACE
    adaptive_token_ids: tuple[int, ...] = ()  # config.json sdsat_adaptive_token_ids: one id per offset, if any
    space_adapter: str | None = None  # config.json space_adapter: gated SPACE adapter folder, relative to the model
    space_datastore: str | None = None  # config.json space_datastore: self-drafted datastore (.npy), relative to the model

    @property
    def max_model_len(self) -> int:
        """Longest sequence served: the position limit, or the sliding window if smaller."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """Parse a Hugging Face `config.json` dictionary."""
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"config.json: model_type {model_type!r} is not supported; "
                f"allowed: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if raw.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"config.json: hidden_act {raw['hidden_act']!r} is not supported; allowed: silu")
        theta, scaling = _rope_settings(raw)
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        attention_bias = bool(raw.get("attention_bias", False))
        sliding = raw.get("sliding_window") if model_type == "mistral" or raw.get("use_sliding_window") else None
        return cls(
            model_type=model_type,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type != "qwen2" and attention_bias,
            sliding_window=int(sliding) if sliding else None,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_as_id_tuple(raw.get("eos_token_id")),
            pad_token_id=raw.get("pad_token_id"),
            space_mask_token_id=raw.get("space_mask_token_id"),
            space_k=raw.get("space_k"),
            space_method=raw.get("space_method"),
            adaptive_token_ids=_as_id_tuple(raw.get("sdsat_adaptive_token_ids")),
            space_adapter=raw.get("space_adapter"),
            space_datastore=raw.get("space_datastore"),
        )

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike) -> "ModelConfig":
        """Read `config.json` of a checkpoint folder."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"model_dir: no config.json in {model_dir}")
        return cls.from_dict(json.loads(path.read_text()))


@dataclass
class SpacePolicy:
    """How many candidates (`k`) each step verifies, chosen from the batch's query budget.

    Per sequence a step feeds `1 + k*(k+2)` query rows; `k` is the largest value
    <= `k_max` for which the whole batch fits in `max_step_query_tokens`, down to 0
    (plain decoding). `prune` attaches mask groups only after the candidate
    positions most likely to be the last accepted one.
    """

    k_max: int | None = None
    max_step_query_tokens: int = 128  # rows per step at most, all sequences: bounds what speculation can cost under load
    prune_groups: int | None = None
    # The planned step (default): candidate trees from `drafters`, rows chosen by the measured cost
    # model. planner=False is the paper's fixed layout (k candidates, a mask group after each).
    planner: bool = True
    drafters: tuple[str, ...] = ("masks", "suffix")
    max_tree_nodes: int = 32  # candidates per sequence and step at most
    max_tree_depth: int = 16  # longest path one step can accept (Info.speculate)
    mask_top_m: int = 2  # mask drafts: top-1 chain plus the next m - 1 tokens at depth 1
    suffix_min_match: int = 1  # suffix drafts: shortest repeated suffix that counts as a match
    suffix_max_match: int = 8  # longest suffix looked up
    # Tokens of recent finished outputs (all requests) where suffix drafts are also looked up; 0: off (the
    # default: a shared cache makes one request's speed, never its output, depend on others' text).
    suffix_shared_tokens: int = 0
    # True: the planner values a node at how often sent nodes of its drafted score (and drafter) were really
    # reached, learnt online (drafters.SurvivalCalibration); False (default): at the drafted score. Measured on
    # an AVX2 CPU: predictions closer to what is realised and fewer rows, throughput the same within noise.
    survival_calibration: bool = False
    latency_curve: dict[int, float] | None = None  # t(N) seconds by rows; None: measured at first use
    # What a speculating request runs when it does not say: "space" (one pass: uncached tokens, tree,
    # groups) or "sdsat" (two passes: a group after the pending token, then a chain or sampled tree).
    speculate_mode: str = "space"
    sdsat_tree_sizes: tuple[int, ...] = SDSAT_TREE_SIZES  # SDSAT sampling: draws per depth of the draft tree

    def __post_init__(self) -> None:
        if self.k_max is not None and not 0 <= self.k_max <= 16:
            raise ValueError(f"space k_max must be in [0, 16], got {self.k_max}")
        if self.max_step_query_tokens < 1:
            raise ValueError(f"max_step_query_tokens must be >= 1, got {self.max_step_query_tokens}")
        if self.prune_groups is not None and self.prune_groups < 1:
            raise ValueError(f"prune_groups must be >= 1 or None, got {self.prune_groups}")
        self.drafters = tuple(self.drafters)
        unknown = [d for d in self.drafters if d not in DRAFTERS]
        if unknown:
            raise ValueError(f"drafters: unknown {unknown}; allowed: {', '.join(DRAFTERS)}")
        for name in ("max_tree_nodes", "max_tree_depth", "mask_top_m", "suffix_min_match", "suffix_max_match"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_tree_depth > MAX_TREE_DEPTH:  # the fused kernel's AMX bound assumes shallow trees
            raise ValueError(f"max_tree_depth must be <= {MAX_TREE_DEPTH}, got {self.max_tree_depth}")
        if self.suffix_shared_tokens < 0:
            raise ValueError(f"suffix_shared_tokens must be >= 0 (0: off), got {self.suffix_shared_tokens}")
        if self.suffix_shared_tokens and "suffix" not in self.drafters:
            raise ValueError("suffix_shared_tokens needs the suffix drafter: add 'suffix' to drafters or set it to 0")
        if self.suffix_min_match > self.suffix_max_match:
            raise ValueError(f"suffix_min_match ({self.suffix_min_match}) must be <= suffix_max_match "
                             f"({self.suffix_max_match})")
        if self.latency_curve is not None and (not self.latency_curve or min(self.latency_curve.values()) <= 0):
            raise ValueError("latency_curve must map row counts to positive seconds")
        if self.speculate_mode not in SPECULATION_METHODS:
            allowed = ", ".join(SPECULATION_METHODS)
            raise ValueError(f"speculate_mode must be one of {allowed}, got {self.speculate_mode!r}")
        self.sdsat_tree_sizes = tuple(int(n) for n in self.sdsat_tree_sizes)
        if not self.sdsat_tree_sizes or min(self.sdsat_tree_sizes) < 1:
            raise ValueError(f"sdsat_tree_sizes must be draws per depth, each >= 1, got {self.sdsat_tree_sizes}")

    def choose_k(self, num_space_seqs: int, other_rows: int, k_max: int) -> int:
        """Largest k <= k_max such that the step stays within the query-token budget."""
        k = k_max
        while k > 0 and other_rows + num_space_seqs * self.rows_per_seq(k) > self.max_step_query_tokens:
            k -= 1
        return k

    def rows_per_seq(self, k: int) -> int:
        """Query rows one sequence sends at `k` (with pruning, fewer groups)."""
        groups = k + 1 if self.prune_groups is None else min(k + 1, self.prune_groups)
        return 1 + k + groups * k


@dataclass
class EngineConfig:
    """Everything the engine needs to start, validated up front."""

    model_dir: str
    dtype: str = "auto"  # resolve_dtype: bf16 where the CPU has native bf16 GEMMs, else float32 (docs/lossless.md)
    device: str = "cpu"
    attention_backend: str = "auto"  # fused on CPU (matmul if it does not build), flash on CUDA if installed, else sdpa
    block_size: int = 16
    kv_cache_bytes: int | None = None
    kv_cache_memory_fraction: float = 0.25
    max_num_seqs: int = 64
    # Prompt tokens computed per step at most (decode rows do not count): a longer prompt, or one beyond what is
    # left of it, is computed in chunks over the next steps (Scheduler, partial plans).
    max_num_batched_tokens: int = 4096
    # Prefix caching (kv_cache.py): computed full blocks (a prompt's once computed, its answer's once the request
    # ends) stay readable, and a later prompt that starts with the same tokens computes only the rest (a chat's next
    # turn repeats the last prompt and its answer). Never changes an output (tests/test_prefix_cache.py).
    prefix_caching: bool = True
    space: SpacePolicy = field(default_factory=SpacePolicy)
    seed: int = 0
    # Rows per GEMM call. None: 32 on CPU in bf16/fp16 (keeps oneDNN's GEMMs batch-invariant,
    # docs/lossless.md), unlimited otherwise; 0: always one call.
    gemm_row_block: int | None = None
    # Gated SPACE adapter folder (docs/adapters.md); None: config.json's space_adapter, if any.
    adapter: str | None = None
    # Self-drafted datastore (datastore.py: the model's own greedy outputs, where suffix drafts are also looked
    # up); None: config.json's space_datastore, if any; "none": off.
    datastore: str | None = None
    # Pack every projection's weight once (model/prepack.py: oneDNN for native bf16, else the panel GEMM):
    # None = on where it applies (CPU, bf16 or float32); True where it does not is refused. Batch-invariant.
    prepack_weights: bool | None = None
    # Row counts 1..N whose packed GEMMs are built at start-up (model/prepack.py, `warm_packed`): oneDNN
    # builds a kernel the first time it sees a row count (~0.5 ms per weight shape), which a step would
    # otherwise pay whenever its row count is new. None: every count a decode step can send, within
    # oneDNN's kernel cache; 0: none.
    warm_gemm_rows: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        self.dtype = resolve_dtype(self.dtype, self.device)
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention_backend!r}"
            )
        if self.attention_backend == "auto":
            self.attention_backend = default_attention_backend(self.device)
        if self.gemm_row_block is None:
            on_cpu = not str(self.device).startswith("cuda")
            self.gemm_row_block = 32 if on_cpu and self.dtype != "float32" else 0
        self._check_prepack()
        if self.gemm_row_block < 0:
            raise ValueError(f"gemm_row_block must be >= 0 (0 = one GEMM call), got {self.gemm_row_block}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be > 0, got {self.kv_cache_bytes}")
        if not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.warm_gemm_rows is not None and self.warm_gemm_rows < 0:
            raise ValueError(f"warm_gemm_rows must be >= 0 (0: none), got {self.warm_gemm_rows}")

    def _check_prepack(self) -> None:
        from tgi_space.model.prepack import can_prepack

        applies = can_prepack(self.device, self.dtype)
        if self.prepack_weights is None:
            self.prepack_weights = applies
        elif self.prepack_weights and not applies:
            raise ValueError(f"prepack_weights: packed weights need device cpu and dtype float32 or bfloat16, and "
                             f"g++ for the panel kernel where bf16 is not native (got {self.device}, {self.dtype}); "
                             f"leave it unset or false")


def resolve_dtype(dtype: str, device: str) -> str:
    """`dtype`, with "auto" resolved: on a CPU bfloat16 where oneDNN has native bf16 GEMMs (AVX512 or
    AVX-NE-CONVERT), else float32 (an AVX2-only CPU runs bf16 GEMMs in a reference loop, measured 5-17x
    slower than float32 at 16-64 rows); on CUDA bfloat16. Both CPU choices are batch-invariant
    (docs/lossless.md)."""
    if dtype != "auto":
        return dtype
    if str(device).startswith("cuda"):
        return "bfloat16"
    from tgi_space.model.prepack import native_bf16_gemm

    return "bfloat16" if native_bf16_gemm() else "float32"


def default_attention_backend(device: str) -> str:
    """On CPU 'fused' (the C++ kernel, batch-invariant) where it builds, else 'matmul' (batch-invariant, one
    call per step); on CUDA 'flash' if flash-attn is installed, else 'sdpa'."""
    if not str(device).startswith("cuda"):
        from tgi_space.attention.fused import available

        return "fused" if available() is None else "matmul"
    import importlib.util

    return "flash" if importlib.util.find_spec("flash_attn") is not None else "sdpa"
