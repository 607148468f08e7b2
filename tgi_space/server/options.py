"""What `serve` runs with: launcher arguments and environment, checked once at start-up."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from tgi_space.config import SDSAT_TREE_SIZES, SPECULATE_MODES, EngineConfig, SpacePolicy, parse_tree_sizes
from tgi_space.watermark import Watermark

log = logging.getLogger(__name__)

DEFAULT_UDS_PATH = "/tmp/text-generation-server"
LAUNCHER_DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}


class UnsupportedOption(ValueError):
    """A launcher option or environment setting this shard refuses, with the reason."""


class ModelNotFound(ValueError):
    """The model id is neither a local folder nor in the Hugging Face cache (there is no network)."""


@dataclass
class ServeOptions:
    """Everything `serve` needs, validated; built by `from_launcher`."""

    model_dir: str
    uds_path: str = DEFAULT_UDS_PATH
    rank: int = 0
    world_size: int = 1
    dtype: str = "auto"  # config.resolve_dtype
    device: str = "cpu"
    speculate_mode: str = "space"  # "space", "sdsat" or "none" (SPECULATE_MODE, the checkpoint, --speculate 0)
    k: int | None = None  # candidates per step at most; None = the checkpoint's space_k
    block_size: int = 16
    kv_cache_bytes: int | None = None  # None: a fraction of free memory after the engine's warm-up
    kv_cache_memory_fraction: float = 0.25
    max_batch_size: int = 64
    max_step_query_tokens: int = 128
    watermark: Watermark = field(default_factory=Watermark)
    max_input_tokens: int | None = None
    planner: bool = True  # the planned tree step; False (TGI_SPACE_FIXED_LAYOUT=1): the paper's fixed layout
    latency_curve: dict[int, float] | None = None  # TGI_SPACE_LATENCY_CURVE='{"1": 6.1, "32": 8.0}' (ms): pins the planner
    drafters: tuple[str, ...] = ("masks", "suffix")  # TGI_SPACE_DRAFTERS=masks,suffix
    suffix_shared_tokens: int = 0  # TGI_SPACE_SUFFIX_SHARED_TOKENS: suffix drafts from all requests' recent outputs
    survival_calibration: bool = False  # TGI_SPACE_SURVIVAL_CALIBRATION=1: nodes valued at their calibrated reach
    adapter: str | None = None  # TGI_SPACE_ADAPTER: gated SPACE adapter folder; None: config.json space_adapter
    datastore: str | None = None  # TGI_SPACE_DATASTORE: self-drafted datastore (.npy); None: config.json's; "none": off
    sdsat_tree_sizes: tuple[int, ...] = SDSAT_TREE_SIZES  # TGI_SPACE_SDSAT_TREE_SIZES=4,8,8,5,3 (SDSAT sampling)
    # PREFILL_CHUNKING (TGI's variable, default on): Info.support_chunking, so the router joins new requests to
    # the running batch's next step (Prefill with cached_batch) and may cut long prompts (chunk_len)
    prefill_chunking: bool = True
    # TGI_SPACE_PREFIX_CACHING (default on): Info.use_prefix_caching, so TGI 3's router shares and reuses
    # prompt blocks (its radix allocator) and sends cache_len, the prompt tokens whose K/V are already in their slots
    prefix_caching: bool = True
    # TGI_SPACE_METRICS_PORT (default: off): Prometheus metrics of the engine (decode steps, rows, tokens, the
    # latency curve, drafts by drafter) on http://{metrics_host}:{port}/metrics. TGI's router exports the
    # request metrics; the speculation figures exist only in the shard.
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"  # TGI_SPACE_METRICS_HOST, as TGI's router binds its own

    def __post_init__(self) -> None:
        if self.speculate_mode not in SPECULATE_MODES:
            allowed = ", ".join(SPECULATE_MODES)
            raise UnsupportedOption(f"SPECULATE_MODE must be one of {allowed}, got {self.speculate_mode!r}")
        if not self.sdsat_tree_sizes or min(self.sdsat_tree_sizes) < 1:
            raise UnsupportedOption(f"TGI_SPACE_SDSAT_TREE_SIZES: draws per depth, each >= 1, got {self.sdsat_tree_sizes}")
        if self.metrics_port is not None and not 0 < self.metrics_port < 65536:
            raise UnsupportedOption(f"TGI_SPACE_METRICS_PORT must be a port number 1..65535, got {self.metrics_port}")
        if self.world_size != 1 or self.rank != 0:
            raise UnsupportedOption(
                f"sharding: WORLD_SIZE={self.world_size} RANK={self.rank}; this shard serves one device "
                "(run the launcher with --num-shard 1)"
            )

    @property
    def socket_path(self) -> str:
        """The file the launcher waits for: `{uds_path}-{rank}`."""
        return f"{self.uds_path}-{self.rank}"

    def urls(self) -> list[str]:
        """Every shard's address, for ServiceDiscovery."""
        return [f"unix://{self.uds_path}-{r}" for r in range(self.world_size)]

    def engine_config(self) -> EngineConfig:
        """The engine's configuration."""
        return EngineConfig(
            model_dir=self.model_dir,
            adapter=self.adapter,
            datastore=self.datastore,
            dtype=self.dtype,
            device=self.device,
            block_size=self.block_size,
            kv_cache_bytes=self.kv_cache_bytes,
            kv_cache_memory_fraction=self.kv_cache_memory_fraction,
            max_num_seqs=self.max_batch_size,
            # --speculate N: the router reserves N extra slots per request, so N bounds the accepted
            # path (the planned step's tree depth) as well as the mask group size.
            space=SpacePolicy(k_max=self.k, max_step_query_tokens=self.max_step_query_tokens, planner=self.planner,
                              latency_curve=self.latency_curve, drafters=self.drafters,
                              suffix_shared_tokens=self.suffix_shared_tokens,
                              survival_calibration=self.survival_calibration,
                              speculate_mode="sdsat" if self.speculate_mode == "sdsat" else "space",
                              sdsat_tree_sizes=self.sdsat_tree_sizes,
                              **({"max_tree_depth": self.k} if self.k else {})),
        )


def from_launcher(
    model_id: str,
    *,
    revision: str | None = None,
    sharded: bool = False,
    quantize: str | None = None,
    speculate: int | None = None,
    dtype: str | None = None,
    kv_cache_dtype: str | None = None,
    trust_remote_code: bool = False,
    uds_path: str = DEFAULT_UDS_PATH,
    max_input_tokens: int | None = None,
    env: dict[str, str] | None = None,
    cuda_available: bool = False,
) -> ServeOptions:
    """ServeOptions from `serve`'s arguments and the shard environment; refuses what we cannot do."""
    env = dict(os.environ if env is None else env)
    if quantize:
        raise UnsupportedOption(
            f"--quantize {quantize}: quantized checkpoints are not supported; serve unquantized weights"
        )
    if kv_cache_dtype:
        raise UnsupportedOption(
            f"--kv-cache-dtype {kv_cache_dtype}: only the model dtype is supported for the KV cache"
        )
    if sharded:
        raise UnsupportedOption("--sharded: tensor parallelism is not supported; run the launcher with --num-shard 1")
    for name in ("LORA_ADAPTERS", "ROPE_SCALING", "ROPE_FACTOR"):
        if env.get(name):
            raise UnsupportedOption(f"{name}={env[name]}: not supported by this shard (remove the launcher flag)")
    if dtype is not None and dtype not in LAUNCHER_DTYPES:
        raise UnsupportedOption(f"--dtype must be one of {', '.join(LAUNCHER_DTYPES)}, got {dtype!r}")
    if speculate is not None and speculate < 0:
        raise UnsupportedOption(f"--speculate must be >= 0, got {speculate}")
    model_dir = resolve_model_dir(model_id, revision, env)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    if config.get("auto_map"):
        raise UnsupportedOption(
            "config.json has auto_map: this checkpoint needs its own code, which this shard never runs"
            + (" (--trust-remote-code is not honoured)" if trust_remote_code else "")
        )
    if trust_remote_code:
        log.warning("--trust-remote-code: ignored, the architecture is built in and no checkpoint code is run")
    rank, world_size = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    device = f"cuda:{rank}" if cuda_available else "cpu"
    return ServeOptions(
        model_dir=model_dir,
        adapter=env.get("TGI_SPACE_ADAPTER") or None,
        datastore=env.get("TGI_SPACE_DATASTORE") or None,
        uds_path=uds_path,
        rank=rank,
        world_size=world_size,
        dtype=LAUNCHER_DTYPES[dtype] if dtype else ("float16" if cuda_available else "auto"),
        device=device,
        speculate_mode=_speculate_mode(config, speculate, env),
        k=speculate if speculate else None,
        block_size=int(env.get("TGI_SPACE_BLOCK_SIZE", 16)),
        planner=env.get("TGI_SPACE_FIXED_LAYOUT", "0") != "1",
        latency_curve=_latency_curve(env.get("TGI_SPACE_LATENCY_CURVE")),
        drafters=tuple(d for d in env.get("TGI_SPACE_DRAFTERS", "masks,suffix").split(",") if d),
        suffix_shared_tokens=_count(env, "TGI_SPACE_SUFFIX_SHARED_TOKENS"),
        sdsat_tree_sizes=_tree_sizes(env.get("TGI_SPACE_SDSAT_TREE_SIZES")),
        kv_cache_bytes=int(env["TGI_SPACE_KV_CACHE_BYTES"]) if env.get("TGI_SPACE_KV_CACHE_BYTES") else None,
        kv_cache_memory_fraction=_memory_fraction(env, cuda_available),
        max_batch_size=int(env.get("MAX_BATCH_SIZE") or 64),
        max_step_query_tokens=int(env.get("TGI_SPACE_MAX_STEP_QUERY_TOKENS", 128)),
        watermark=Watermark.from_env(env),
        prefill_chunking=_flag(env, "PREFILL_CHUNKING", True),
        prefix_caching=_flag(env, "TGI_SPACE_PREFIX_CACHING", True),
        survival_calibration=_flag(env, "TGI_SPACE_SURVIVAL_CALIBRATION", False),
        max_input_tokens=max_input_tokens,
        metrics_port=_count(env, "TGI_SPACE_METRICS_PORT") if env.get("TGI_SPACE_METRICS_PORT") else None,
        metrics_host=env.get("TGI_SPACE_METRICS_HOST") or "0.0.0.0",
    )


def _flag(env: dict[str, str], name: str, default: bool) -> bool:
    """A boolean environment variable: 1/true or 0/false (any case), the default when unset."""
    text = env.get(name, "").strip().lower()
    if not text:
        return default
    if text not in ("1", "true", "0", "false"):
        raise UnsupportedOption(f"{name}={env[name]}: must be one of 1, true, 0, false")
    return text in ("1", "true")


def _count(env: dict[str, str], name: str) -> int:
    """A non-negative integer environment variable (0 when unset)."""
    text = env.get(name, "0") or "0"
    if not text.isdigit():
        raise UnsupportedOption(f"{name} must be a whole number >= 0, got {text!r}")
    return int(text)


def _speculate_mode(config: dict, speculate: int | None, env: dict[str, str]) -> str:
    """space (or sdsat, if asked) when the checkpoint has a mask token, SPECULATE_MODE allows it and --speculate
    is not 0. TGI_SPACE_SPECULATE_MODE wins over SPECULATE_MODE."""
    asked = (env.get("TGI_SPACE_SPECULATE_MODE") or env.get("SPECULATE_MODE", "")).strip().lower()
    if asked and asked not in SPECULATE_MODES:
        raise UnsupportedOption(f"SPECULATE_MODE must be one of {', '.join(SPECULATE_MODES)}, got {asked!r}")
    has_mask = config.get("space_mask_token_id") is not None or bool(
        config.get("space_adapter") or env.get("TGI_SPACE_ADAPTER"))  # a gated adapter brings its mask token
    if asked in ("space", "sdsat") and not has_mask:
        raise UnsupportedOption(f"SPECULATE_MODE={asked} needs a checkpoint with a mask/adaptive token "
                                "(config.json space_mask_token_id)")
    if speculate and not has_mask:
        log.warning("--speculate %d: the checkpoint has no space_mask_token_id, serving without speculation", speculate)
    if asked == "none" or speculate == 0 or not has_mask:
        return "none"
    return "sdsat" if asked == "sdsat" else "space"


def _memory_fraction(env: dict[str, str], cuda_available: bool) -> float:
    """Share of free memory for the KV cache: CUDA_MEMORY_FRACTION x TGI_WIGGLE_ROOM on GPU."""
    if not cuda_available:
        return 0.25
    return float(env.get("CUDA_MEMORY_FRACTION", 1)) * float(env.get("TGI_WIGGLE_ROOM", 0.9))


def resolve_model_dir(model_id: str, revision: str | None, env: dict[str, str]) -> str:
    """A local checkpoint folder, or the snapshot of model_id in the Hugging Face cache; never a download."""
    if Path(model_id).is_dir():
        return str(Path(model_id))
    for cache in _hub_caches(env):
        folder = Path(cache) / ("models--" + model_id.replace("/", "--"))
        ref = revision or "main"
        ref_file = folder / "refs" / ref
        snapshot = folder / "snapshots" / (ref_file.read_text().strip() if ref_file.is_file() else ref)
        if (snapshot / "config.json").is_file():
            return str(snapshot)
    raise ModelNotFound(
        f"model id {model_id!r}: not a local folder and not in the Hugging Face cache; this shard has no "
        "network and never downloads. Pass the path of a checkpoint folder instead."
    )


def _hub_caches(env: dict[str, str]) -> list[str]:
    """Where a Hugging Face cache may be, in the launcher's order of precedence."""
    home = env.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    names = ("WEIGHTS_CACHE_OVERRIDE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_CACHE")
    return [env[n] for n in names if env.get(n)] + [str(Path(home) / "hub")]


def check_weights(model_dir: str, extension: str = ".safetensors") -> list[str]:
    """Files a checkpoint folder lacks to be served (empty when complete)."""
    folder = Path(model_dir)
    missing = [name for name in ("config.json", "tokenizer.json") if not (folder / name).is_file()]
    if not any(folder.glob(f"*{extension}")):
        missing.append(f"*{extension}")
    return missing


def _tree_sizes(raw: str | None) -> tuple[int, ...]:
    """TGI_SPACE_SDSAT_TREE_SIZES: draws per depth of SDSAT's sampled tree, comma-separated."""
    if not raw:
        return SDSAT_TREE_SIZES
    try:
        return parse_tree_sizes(raw)
    except ValueError as err:
        raise UnsupportedOption(f"TGI_SPACE_SDSAT_TREE_SIZES: {err}") from err


def _latency_curve(raw: str | None) -> dict[int, float] | None:
    """TGI_SPACE_LATENCY_CURVE: JSON {rows: milliseconds}; seconds by rows for the planner."""
    if not raw:
        return None
    try:
        return {int(n): float(ms) / 1000 for n, ms in json.loads(raw).items()}
    except (ValueError, AttributeError, TypeError) as err:
        raise UnsupportedOption(f"TGI_SPACE_LATENCY_CURVE must be JSON like {{\"1\": 6.0, \"32\": 8.0}}: {err}") from err
