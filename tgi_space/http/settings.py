"""Server settings: TGI's router options (names, defaults, environment variables) plus the engine's."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tgi_space.config import ATTENTION_BACKENDS, DTYPE_CHOICES, SDSAT_TREE_SIZES, SPECULATE_MODES
from tgi_space.http.threads import default_num_threads


@dataclass
class ServeSettings:
    """Everything `tgi-space serve` needs; `None` limits are filled from the checkpoint at load time."""

    model_id: str
    adapter: str | None = None  # gated SPACE adapter folder (docs/adapters.md); None: config.json's space_adapter
    datastore: str | None = None  # self-drafted datastore .npy (datastore.py); None: config.json's; "none": off
    hostname: str = "127.0.0.1"
    port: int = 3000
    # router limits (TGI's names and defaults)
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_input_tokens: int | None = None  # default: max_total_tokens - 1
    max_total_tokens: int | None = None  # default: the model's context length
    max_batch_prefill_tokens: int = 4096
    max_batch_size: int | None = None  # default: the engine's max_num_seqs
    max_client_batch_size: int = 4
    payload_limit: int = 2_000_000
    otlp_endpoint: str | None = None  # OTLP/gRPC collector for traces (TGI's --otlp-endpoint); None: no tracing
    otlp_service_name: str = "tgi-space"
    api_key: str | None = None  # Bearer token required on every route but health, info, metrics, docs
    cors_allow_origin: list[str] | None = None  # None: any origin (as TGI)
    head_timeout_s: float = 10.0  # a request head must arrive within this (408 and close otherwise)
    validation_workers: int = 2  # processes that tokenize large inputs (small ones: a thread)
    # engine
    speculate_mode: str | None = None  # None: "space" if the checkpoint has a mask token, else "none"; or "sdsat"
    space_k_max: int | None = None
    max_step_query_tokens: int = 128
    fixed_layout: bool = False  # the paper's fixed layout instead of the planned tree step
    drafters: tuple[str, ...] = ("masks", "suffix")
    max_tree_nodes: int = 32
    max_tree_depth: int = 16
    mask_top_m: int = 2
    suffix_min_match: int = 1
    suffix_max_match: int = 8
    suffix_shared_tokens: int = 0  # suffix drafts from recent outputs of all requests too; 0: off
    survival_calibration: bool = False  # nodes valued at their calibrated chance to be reached (SpacePolicy)
    sdsat_tree_sizes: tuple[int, ...] = SDSAT_TREE_SIZES  # SDSAT sampling: draft tree draws per depth
    dtype: str = "auto"  # config.resolve_dtype: bf16 on CPUs with native bf16 GEMMs, else float32
    device: str = "auto"  # auto: cuda if torch sees a GPU, else cpu (TGI always uses the GPU)
    attention_backend: str | None = None  # None: the engine's default for the device
    block_size: int = 16
    kv_cache_bytes: int | None = None
    prefix_caching: bool = True  # computed full blocks are reused by later prompts that start the same way
    num_threads: int | None = None  # None: the physical cores this process may use
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in [1, 65535], got {self.port}")
        if self.speculate_mode is not None and self.speculate_mode not in SPECULATE_MODES:
            raise ValueError(f"speculate_mode must be one of {', '.join(SPECULATE_MODES)}, got {self.speculate_mode!r}")
        if not self.sdsat_tree_sizes or min(self.sdsat_tree_sizes) < 1:
            raise ValueError(f"sdsat_tree_sizes must be draws per depth, each >= 1, got {self.sdsat_tree_sizes}")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if not (self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", self.device)):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.attention_backend is not None and self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention_backend!r}"
            )
        if not self.head_timeout_s > 0:
            raise ValueError(f"head_timeout_s must be > 0, got {self.head_timeout_s}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        positive = {
            "max_concurrent_requests": self.max_concurrent_requests,
            "max_best_of": self.max_best_of,
            "max_stop_sequences": self.max_stop_sequences + 1,
            "max_batch_prefill_tokens": self.max_batch_prefill_tokens,
            "max_client_batch_size": self.max_client_batch_size,
            "payload_limit": self.payload_limit,
            "validation_workers": self.validation_workers,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.check_token_limits(self.max_input_tokens, self.max_total_tokens)

    @staticmethod
    def check_token_limits(max_input: int | None, max_total: int | None) -> None:
        """TGI's launcher rule: `max_input_tokens` < `max_total_tokens`."""
        if max_input is not None and max_total is not None and max_input >= max_total:
            raise ValueError(f"`max_input_tokens`({max_input}) must be < `max_total_tokens`({max_total})")

    def uvicorn_options(self) -> dict:
        """uvicorn's HTTP protocol with head-size and head-time limits (tgi_space/http/protocol.py)."""
        from tgi_space.http.protocol import MAX_HEAD_BYTES, guarded_protocol

        return {"http": guarded_protocol(self.head_timeout_s), "h11_max_incomplete_event_size": MAX_HEAD_BYTES}

    def resolve_device(self, cuda_available: bool) -> str:
        """The torch device: `auto` is cuda when a GPU is visible; cuda without one is an error, not a silent CPU."""
        if self.device == "auto":
            return "cuda" if cuda_available else "cpu"
        if self.device.startswith("cuda") and not cuda_available:
            raise ValueError(f"device {self.device}: torch sees no CUDA device (is a CUDA build of torch installed?)")
        return self.device

    def resolve_num_threads(self) -> int:
        """torch CPU threads: --num-threads, else the physical cores this process may use."""
        return self.num_threads if self.num_threads is not None else default_num_threads()

    def resolve_limits(self, max_model_len: int, kv_cache_tokens: int | None = None) -> tuple[int, int]:
        """(max_input_tokens, max_total_tokens): defaults from the context length and what the KV cache holds.

        `kv_cache_tokens`: the longest request the cache can hold (slots minus the k candidate slots).
        A max_total_tokens given explicitly beyond it is an error, as in TGI's warm-up; left unset, it is capped.
        """
        max_total = self.max_total_tokens or max_model_len
        if max_total > max_model_len:
            raise ValueError(f"max_total_tokens ({max_total}) must be <= the model's context length ({max_model_len})")
        if kv_cache_tokens is not None and max_total > kv_cache_tokens:
            if self.max_total_tokens is not None:
                raise ValueError(
                    f"max_total_tokens ({max_total}) does not fit the KV cache, which holds requests of at most "
                    f"{kv_cache_tokens} tokens; raise --kv-cache-bytes or lower --max-total-tokens"
                )
            max_total = kv_cache_tokens
        if max_total < 2:
            raise ValueError(f"kv_cache_bytes: the KV cache holds requests of {kv_cache_tokens} tokens, too few to serve")
        max_input = self.max_input_tokens if self.max_input_tokens is not None else max_total - 1
        self.check_token_limits(max_input, max_total)
        return max_input, max_total
