"""`tgi-space serve`: TGI's HTTP API and the OpenAI routes on one checkpoint, with uvicorn.

Every option also reads the environment variable TGI's launcher and router use (MODEL_ID,
HOSTNAME, PORT, MAX_INPUT_TOKENS, ...), so the same settings work for both.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from tgi_space.config import parse_tree_sizes
from tgi_space.http.settings import ServeSettings


def resolve_model_dir(model_id: str) -> str:
    """A local checkpoint folder as is; a Hub repository id is downloaded. Errors are one clear line."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise typer.BadParameter(f"{model_id} is a file; give the checkpoint's folder", param_hint="--model")
    if looks_local(model_id):
        raise typer.BadParameter(f"no such folder: {model_id} (and it is not a Hub repository id)", param_hint="--model")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as err:  # noqa: BLE001 - any Hub failure: one line, not a 360-line traceback
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise typer.BadParameter(
            f"{model_id!r} is not a local folder, and downloading it from the Hub failed: {type(err).__name__}: {reason}",
            param_hint="--model",
        ) from None


def looks_local(model_id: str) -> bool:
    """Whether `model_id` can only mean a path: absolute, relative with ./ ../ ~, more than one `/`, an existing file,
    or a first component that is a local folder (`models/tiny-space-pi`)."""
    if model_id.startswith(("/", "./", "../", "~", ".\\")) or "\\" in model_id or model_id.count("/") > 1:
        return True
    path = Path(model_id)
    return path.exists() or (len(path.parts) > 1 and Path(path.parts[0]).is_dir())


def serve(
    model: str = typer.Option(..., "--model", "--model-id", envvar="MODEL_ID", help="Checkpoint folder (or Hub id)."),
    adapter: Optional[str] = typer.Option(
        None, "--adapter", envvar="SPACE_ADAPTER", help="Gated SPACE adapter folder (default: config.json space_adapter)."
    ),
    datastore: Optional[str] = typer.Option(
        None, "--datastore", envvar="SPACE_DATASTORE",
        help="Self-drafted datastore .npy for suffix drafts (default: config.json space_datastore; 'none': off).",
    ),
    hostname: str = typer.Option("127.0.0.1", envvar="HOSTNAME", help="Address to listen on (TGI: 0.0.0.0)."),
    port: int = typer.Option(3000, envvar="PORT"),
    max_concurrent_requests: int = typer.Option(128, envvar="MAX_CONCURRENT_REQUESTS"),
    max_best_of: int = typer.Option(2, envvar="MAX_BEST_OF"),
    max_stop_sequences: int = typer.Option(4, envvar="MAX_STOP_SEQUENCES"),
    max_top_n_tokens: int = typer.Option(5, envvar="MAX_TOP_N_TOKENS"),
    max_input_tokens: Optional[int] = typer.Option(None, envvar="MAX_INPUT_TOKENS", help="Default: max_total_tokens - 1."),
    max_total_tokens: Optional[int] = typer.Option(None, envvar="MAX_TOTAL_TOKENS", help="Default: the model's context length."),
    max_batch_prefill_tokens: int = typer.Option(4096, envvar="MAX_BATCH_PREFILL_TOKENS"),
    max_batch_size: Optional[int] = typer.Option(None, envvar="MAX_BATCH_SIZE", help="Sequences per step (default 64)."),
    max_client_batch_size: int = typer.Option(4, envvar="MAX_CLIENT_BATCH_SIZE"),
    payload_limit: int = typer.Option(2_000_000, envvar="PAYLOAD_LIMIT", help="Request body limit in bytes."),
    validation_workers: int = typer.Option(2, envvar="VALIDATION_WORKERS", help="Processes that tokenize large inputs."),
    speculate_mode: Optional[str] = typer.Option(
        None, "--speculate-mode", "--speculate", envvar=["TGI_SPACE_SPECULATE_MODE", "SPECULATE_MODE"],
        help="space | sdsat | none (default: space on a SPACE checkpoint).",
    ),
    sdsat_tree_sizes: str = typer.Option(
        "4,8,8,5,3", envvar="SPACE_SDSAT_TREE_SIZES", help="SDSAT sampling: draft tree draws per depth."
    ),
    space_k_max: Optional[int] = typer.Option(None, envvar="SPACE_K_MAX", help="Candidates per step at most (default: the checkpoint's)."),
    max_step_query_tokens: int = typer.Option(128, envvar="SPACE_MAX_STEP_QUERY_TOKENS", help="Query rows per step at most (all sequences)."),
    fixed_layout: bool = typer.Option(False, "--fixed-layout", envvar="SPACE_FIXED_LAYOUT", help="The paper's fixed SPACE layout instead of planned trees."),
    drafters: str = typer.Option("masks,suffix", envvar="SPACE_DRAFTERS", help="Drafters of the planned step: masks, suffix."),
    max_tree_nodes: int = typer.Option(32, envvar="SPACE_MAX_TREE_NODES", help="Candidates per sequence and step at most."),
    max_tree_depth: int = typer.Option(16, envvar="SPACE_MAX_TREE_DEPTH", help="Longest path one step can accept."),
    mask_top_m: int = typer.Option(2, envvar="SPACE_MASK_TOP_M", help="Mask drafts: top-1 chain plus m - 1 runners-up at depth 1."),
    suffix_min_match: int = typer.Option(1, envvar="SPACE_SUFFIX_MIN_MATCH", help="Suffix drafts: shortest repeated suffix used."),
    suffix_max_match: int = typer.Option(8, envvar="SPACE_SUFFIX_MAX_MATCH", help="Suffix drafts: longest suffix looked up."),
    suffix_shared_tokens: int = typer.Option(
        0, envvar="SPACE_SUFFIX_SHARED_TOKENS",
        help="Suffix drafts also from this many tokens of recent outputs of all requests; 0: off (with it, one "
             "request's speed, never its output, depends on other requests' text).",
    ),
    survival_calibration: bool = typer.Option(
        False, "--survival-calibration/--no-survival-calibration", envvar="SPACE_SURVIVAL_CALIBRATION",
        help="Value each drafted node at how often sent nodes of its score and drafter were really reached "
             "(learnt online) instead of at its drafted score.",
    ),
    dtype: str = typer.Option("auto", envvar="DTYPE", help="auto (CPU: bfloat16 where it has native bf16 GEMMs, else float32; both batch-invariant, docs/lossless.md) | bfloat16 | float32 | float16."),
    device: str = typer.Option("auto", envvar="DEVICE", help="auto (cuda if torch sees a GPU, else cpu) | cpu | cuda | cuda:N."),
    attention_backend: Optional[str] = typer.Option(
        None, envvar="ATTENTION_BACKEND", help="Attention kernels (default: the engine's choice for the device)."
    ),
    block_size: int = typer.Option(16, envvar="BLOCK_SIZE"),
    kv_cache_bytes: Optional[int] = typer.Option(None, envvar="KV_CACHE_BYTES", help="Default: a fraction of free memory."),
    prefix_caching: bool = typer.Option(
        True, "--prefix-caching/--no-prefix-caching", envvar="PREFIX_CACHING",
        help="Reuse computed KV blocks (prompts, and answers once ended) for later prompts that start with the same "
             "tokens, e.g. a chat's next turn (never changes an output).",
    ),
    num_threads: Optional[int] = typer.Option(
        None, envvar="NUM_THREADS", help="torch CPU threads (default: the physical cores this process may use)."
    ),
    seed: int = typer.Option(0, envvar="SEED", help="Seeds the engine's own random numbers."),
    log_level: str = typer.Option("info", envvar="LOG_LEVEL"),
    json_output: bool = typer.Option(False, "--json-output", envvar="JSON_OUTPUT", help="Logs as one JSON object per line."),
    api_key: Optional[str] = typer.Option(None, envvar="API_KEY", help="Require `Authorization: Bearer <key>`."),
    otlp_endpoint: Optional[str] = typer.Option(None, envvar="OTLP_ENDPOINT", help="OTLP/gRPC collector for traces, e.g. http://127.0.0.1:4317 (needs the otel extra)."),
    otlp_service_name: str = typer.Option("tgi-space", envvar="OTLP_SERVICE_NAME"),
    cors_allow_origin: Optional[List[str]] = typer.Option(
        None, envvar="CORS_ALLOW_ORIGIN", help="Allowed CORS origins (repeat the option); default: any."
    ),
) -> None:
    """Serve a checkpoint with TGI's HTTP API (`/generate`, `/generate_stream`, ...) and OpenAI's routes."""
    import uvicorn

    from tgi_space.http.access import configure_logging
    from tgi_space.http.app import create_app

    log_config = configure_logging(log_level, json_output)
    try:
        settings = ServeSettings(
            model_id=model, adapter=adapter, datastore=datastore, hostname=hostname, port=port,
            max_concurrent_requests=max_concurrent_requests,
            max_best_of=max_best_of, max_stop_sequences=max_stop_sequences, max_top_n_tokens=max_top_n_tokens,
            max_input_tokens=max_input_tokens, max_total_tokens=max_total_tokens,
            max_batch_prefill_tokens=max_batch_prefill_tokens, max_batch_size=max_batch_size,
            max_client_batch_size=max_client_batch_size, payload_limit=payload_limit, speculate_mode=speculate_mode,
            validation_workers=validation_workers,
            space_k_max=space_k_max, max_step_query_tokens=max_step_query_tokens, dtype=dtype, device=device,
            fixed_layout=fixed_layout, drafters=tuple(d for d in drafters.split(",") if d),
            max_tree_nodes=max_tree_nodes, max_tree_depth=max_tree_depth, mask_top_m=mask_top_m,
            sdsat_tree_sizes=parse_tree_sizes(sdsat_tree_sizes),
            suffix_min_match=suffix_min_match, suffix_max_match=suffix_max_match, suffix_shared_tokens=suffix_shared_tokens,
            survival_calibration=survival_calibration, attention_backend=attention_backend, block_size=block_size,
            kv_cache_bytes=kv_cache_bytes, prefix_caching=prefix_caching, num_threads=num_threads, seed=seed, api_key=api_key, otlp_endpoint=otlp_endpoint, otlp_service_name=otlp_service_name,
            cors_allow_origin=list(cors_allow_origin) if cors_allow_origin else None,
        )
        import torch

        settings.resolve_device(torch.cuda.is_available())  # --device cuda without a GPU: say so now
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    app = create_app(settings, resolve_model_dir(model))
    extra = {"log_config": log_config} if log_config else {}
    extra.update(settings.uvicorn_options())
    uvicorn.run(app, host=hostname, port=port, log_level=log_level.lower(), timeout_graceful_shutdown=5, **extra)


def register(app: typer.Typer) -> None:
    """Add the `serve` command to the `tgi-space` CLI."""
    app.command("serve")(serve)
