"""`text-generation-server` dispatch: SPACE checkpoints to this project's shard, anything else to TGI's.

TGI's launcher runs `text-generation-server download-weights <model>` and then
`text-generation-server serve <model> ...` per shard. `serve` of a SPACE checkpoint (a local
folder, or a Hub id already in the cache, whose config.json has `space_mask_token_id` or
`space_adapter`; or any model with TGI_SPACE_ADAPTER set) runs
`tgi_space.server.cli`; every other command and model goes to the next `text-generation-server`
on PATH (TGI's own) with the arguments unchanged. `TGI_SPACE_SHARD=space|tgi` forces the choice.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tgi_space.launcher.path import NotFound, next_on_path


def local_config(model_id: str, revision: str | None = None) -> Path | None:
    """config.json of a local folder, or of a Hub id already in the local cache."""
    folder = Path(model_id)
    if folder.is_dir():
        path = folder / "config.json"
        return path if path.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        cached = try_to_load_from_cache(model_id, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - a malformed id is simply not ours
        return None
    return Path(cached) if isinstance(cached, str) else None


def is_space_checkpoint(model_id: str, revision: str | None = None) -> bool:
    """Whether the model's config.json names a SPACE mask token or a gated SPACE adapter."""
    path = local_config(model_id, revision)
    if path is None:
        return False
    try:
        config = json.loads(path.read_text())
        return config.get("space_mask_token_id") is not None or bool(config.get("space_adapter"))
    except (OSError, ValueError):
        return False


def choose(args: list[str], env: dict[str, str]) -> str:
    """"space" (this project's shard) or "tgi" (TGI's server) for these arguments."""
    forced = env.get("TGI_SPACE_SHARD", "").strip().lower()
    if forced in ("space", "tgi"):
        return forced
    if len(args) < 2 or args[0] != "serve":
        return "tgi"
    if env.get("TGI_SPACE_ADAPTER"):  # a gated SPACE adapter for this base: only this project's shard serves it
        return "space"
    revision = None
    if "--revision" in args[:-1]:
        revision = args[args.index("--revision") + 1]
    return "space" if is_space_checkpoint(args[1], revision) else "tgi"


def main() -> None:
    """Console entry point: run our shard in-process, or exec TGI's server."""
    args = sys.argv[1:]
    if choose(args, dict(os.environ)) == "space":
        from tgi_space.server.cli import app

        app(args=args, prog_name="text-generation-server")
        return
    try:
        real = os.environ.get("TGI_SPACE_REAL_SERVER") or next_on_path("text-generation-server")
    except NotFound as err:
        print(f"text-generation-server (tgi-space dispatch): {err}", file=sys.stderr)
        sys.exit(2)
    os.execv(real, [real, *args])


if __name__ == "__main__":
    main()
