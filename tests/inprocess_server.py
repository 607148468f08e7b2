"""`tgi-space serve`'s app under uvicorn on a thread of the test process: real sockets, no second torch import."""

from __future__ import annotations

import threading
import time

import uvicorn

from tests.http_server import ENGINE_ARGS, free_port
from tgi_space.http.app import create_app
from tgi_space.http.settings import ServeSettings


class InProcessServer:
    """The app loaded before start (so tests may reach its engine), served on 127.0.0.1:<free port>."""

    def __init__(self, model_dir, **settings) -> None:
        options = {"kv_cache_bytes": ENGINE_ARGS["kv_cache_bytes"], "block_size": ENGINE_ARGS["block_size"],
                   "num_threads": 1, "device": "cpu", **settings}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(ServeSettings(model_id=str(model_dir), port=self.port, **options), str(model_dir),
                              load_in_background=False)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
                                **self.state.settings.uvicorn_options())
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)

    @property
    def state(self):
        return self.app.state.tgi

    def start(self, timeout: float = 30.0) -> "InProcessServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
