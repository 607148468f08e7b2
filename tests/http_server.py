"""Start `tgi-space serve` as a subprocess on a free port, for the HTTP tests and the load benchmark."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
ENGINE_ARGS = {"kv_cache_bytes": 2**24, "block_size": 4}  # shared with the offline reference engine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_chat_template(src: Path, dst: Path) -> Path:
    """A copy of checkpoint `src` whose tokenizer_config.json has a (word-level) chat template."""
    shutil.copytree(src, dst, dirs_exist_ok=True)
    path = dst / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    path.write_text(json.dumps(cfg))
    return dst


class ServerProcess:
    """`tgi-space serve` on 127.0.0.1:<free port>; `stop()` ends it by its pid."""

    def __init__(self, model_dir: Path, log_path: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [
            sys.executable, "-m", "tgi_space.cli", "serve", "--model", str(model_dir), "--port", str(self.port),
            "--num-threads", "1", "--kv-cache-bytes", str(ENGINE_ARGS["kv_cache_bytes"]),
            "--block-size", str(ENGINE_ARGS["block_size"]), "--log-level", "warning", *extra,
        ]
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    def wait_healthy(self, timeout: float = 120.0) -> "ServerProcess":
        """Poll /health until 200 (the model is loaded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not healthy after {timeout}s; see {self.log.name}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in a Prometheus text exposition (0.0 if absent)."""
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0
