"""`text-generation-server`: the command TGI's launcher runs (`download-weights`, then `serve` per rank).

Every argument the launcher passes is accepted; flags this shard does not know
are logged and ignored; options it cannot honour are refused with the reason.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import typer

from tgi_space.server.logs import setup_logging
from tgi_space.server.options import (
    DEFAULT_UDS_PATH,
    ModelNotFound,
    ServeOptions,
    UnsupportedOption,
    check_weights,
    from_launcher,
    resolve_model_dir,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
log = logging.getLogger("tgi_space.server")

LENIENT = {"allow_extra_args": True, "ignore_unknown_options": True}
# Environment the launcher sets that has no meaning here (logged at DEBUG, never an error).
IGNORED_ENV = ("CUDA_GRAPHS", "DISABLE_CUSTOM_KERNELS", "ATTENTION", "PREFIX_CACHING", "MAX_TOTAL_TOKENS",
               "TORCH_NCCL_AVOID_RECORD_STREAMS", "SAFETENSORS_FAST_GPU", "PREFILL_CHUNKING", "REQUEST_LOGPROBS")


def run_server(options: ServeOptions) -> None:
    """Load the model and serve (replaced in CLI tests)."""
    from tgi_space.server.service import serve_forever  # noqa: PLC0415 - torch/grpc only when serving

    serve_forever(options)


def _cuda_available() -> bool:
    import torch  # noqa: PLC0415

    return torch.cuda.is_available()


def _log_extras(ctx: typer.Context, otlp_endpoint: Optional[str]) -> None:
    if ctx.args:
        log.warning("Ignoring arguments this shard does not know: %s", " ".join(ctx.args))
    if otlp_endpoint:
        log.warning("--otlp-endpoint %s: tracing export is not implemented, ignored", otlp_endpoint)
    for name in IGNORED_ENV:
        if name in os.environ:
            log.debug("%s=%s: not used by this shard", name, os.environ[name])


@app.command(context_settings=LENIENT)
def serve(
    ctx: typer.Context,
    model_id: str,
    revision: Optional[str] = None,
    sharded: bool = False,
    quantize: Optional[str] = None,
    speculate: Optional[int] = None,
    dtype: Optional[str] = None,
    kv_cache_dtype: Optional[str] = None,
    trust_remote_code: bool = False,
    uds_path: Path = Path(DEFAULT_UDS_PATH),
    logger_level: str = "INFO",
    json_output: bool = False,
    otlp_endpoint: Optional[str] = None,
    otlp_service_name: str = "text-generation-inference.server",
    max_input_tokens: Optional[int] = None,
) -> None:
    """Load MODEL_ID and serve TGI's gRPC v3 protocol on unix://{uds_path}-{RANK}."""
    setup_logging(logger_level, json_output)
    _log_extras(ctx, otlp_endpoint)
    try:
        options = from_launcher(
            model_id, revision=revision, sharded=sharded, quantize=quantize, speculate=speculate, dtype=dtype,
            kv_cache_dtype=kv_cache_dtype, trust_remote_code=trust_remote_code, uds_path=str(uds_path),
            max_input_tokens=max_input_tokens, cuda_available=_cuda_available(),
        )
    except (UnsupportedOption, ModelNotFound, ValueError) as err:
        log.error("%s", err)
        raise typer.Exit(1) from None
    try:
        run_server(options)
    except UnsupportedOption as err:  # found while starting: a checkpoint that cannot do what was asked, a port in use
        log.error("%s", err)
        raise typer.Exit(1) from None


@app.command("download-weights", context_settings=LENIENT)
def download_weights(
    ctx: typer.Context,
    model_id: str,
    revision: Optional[str] = None,
    extension: str = ".safetensors",
    auto_convert: bool = True,
    logger_level: str = "INFO",
    json_output: bool = False,
    otlp_endpoint: Optional[str] = None,
    otlp_service_name: str = "text-generation-inference.download",
    trust_remote_code: bool = False,
    merge_lora: bool = False,
) -> None:
    """Check that MODEL_ID's weights are on this host; this shard never downloads (no network)."""
    setup_logging(logger_level, json_output)
    _log_extras(ctx, otlp_endpoint)
    try:
        model_dir = resolve_model_dir(model_id, revision, dict(os.environ))
    except ModelNotFound as err:
        log.error("%s", err)
        raise typer.Exit(1) from None
    missing = check_weights(model_dir, extension)
    if missing:
        log.error("%s is incomplete: missing %s (no network: nothing can be downloaded or converted)",
                  model_dir, ", ".join(missing))
        raise typer.Exit(1)
    log.info("Files are already present on the host: %s", model_dir)


if __name__ == "__main__":
    app()
