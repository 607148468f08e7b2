"""`tgi-space serve` as a new user meets it (issue 11, items 6, 8, 9, 14)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from tests.http_server import ENGINE_ARGS
from tgi_space.cli import app
from tgi_space.http.app import create_app
from tgi_space.http.settings import ServeSettings
from tgi_space.http.threads import physical_cores

runner = CliRunner()


def serve(*args: str, env: dict | None = None):
    return runner.invoke(app, ["serve", *args], env=env)


def assert_short_error(result, text: str) -> None:
    assert result.exit_code == 2, result.output
    assert text in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.splitlines()) < 20, result.output


# ---- item 14: a mistyped model path ----------------------------------------------------------------


def test_mistyped_local_folder_says_no_such_folder(tmp_path, monkeypatch):
    assert_short_error(serve("--model", str(tmp_path / "no" / "such")), "no such folder")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert_short_error(serve("--model", "models/tiny-space-pi"), "no such folder")  # one slash, but models/ is here
    assert_short_error(serve("--model", "./tiny"), "no such folder")
    (tmp_path / "weights.safetensors").write_bytes(b"")
    assert_short_error(serve("--model", "weights.safetensors"), "is a file")


def test_hub_failure_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = serve("--model", "nobody-tgi-space-test/no-such-model", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert_short_error(result, "downloading it from the Hub failed")


# ---- item 8: device, dtype, attention backend --------------------------------------------------------


def test_device_dtype_and_backend_options_are_checked(tmp_path, llama_dir):
    assert_short_error(serve("--model", str(llama_dir), "--device", "tpu"), "device must be")
    assert_short_error(serve("--model", str(llama_dir), "--attention-backend", "nope"), "attention_backend must be")
    assert_short_error(serve("--model", str(llama_dir), "--dtype", "float8"), "dtype must be")
    if not torch.cuda.is_available():
        assert_short_error(serve("--model", str(llama_dir), "--device", "cuda"), "torch sees no CUDA device")


def test_device_resolution():
    settings = ServeSettings(model_id="m")
    assert settings.device == "auto"
    assert settings.resolve_device(cuda_available=False) == "cpu"
    assert settings.resolve_device(cuda_available=True) == "cuda"
    assert ServeSettings(model_id="m", device="cuda:1").resolve_device(True) == "cuda:1"
    with pytest.raises(ValueError, match="sees no CUDA device"):
        ServeSettings(model_id="m", device="cuda").resolve_device(False)


def test_serve_passes_device_and_backend_to_the_engine(llama_dir):
    app_ = create_app(ServeSettings(model_id=str(llama_dir), device="cpu", attention_backend="sdpa", num_threads=1,
                                    **ENGINE_ARGS), str(llama_dir), load_in_background=False)
    engine = app_.state.tgi.service.engine
    try:
        assert (engine.config.device, engine.config.attention_backend) == ("cpu", "sdpa")
    finally:
        app_.state.tgi.service.worker.stop()


def test_serve_passes_the_shared_suffix_cache_budget_to_the_engine(llama_dir):
    app_ = create_app(ServeSettings(model_id=str(llama_dir), device="cpu", num_threads=1, suffix_shared_tokens=4096,
                                    **ENGINE_ARGS), str(llama_dir), load_in_background=False)
    engine = app_.state.tgi.service.engine
    try:
        assert engine.config.space.suffix_shared_tokens == 4096 and engine.speculator.shared.max_tokens == 4096
    finally:
        app_.state.tgi.service.worker.stop()


# ---- item 9: CPU threads ----------------------------------------------------------------------------


def fake_topology(root, cores: dict[int, tuple[int, int]]):
    for cpu, (package, core) in cores.items():
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")
    return root


def test_physical_cores_count_hyperthreads_once(tmp_path):
    root = fake_topology(tmp_path, {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1), 4: (1, 0)})
    assert physical_cores({0, 1, 2, 3, 4}, root) == 3
    assert physical_cores({0, 2}, root) == 1  # two siblings of one core: one thread, not two
    assert physical_cores({5, 6}, root) == 2  # no topology: the logical count


def test_default_threads_are_the_physical_cores():
    assert ServeSettings(model_id="m").resolve_num_threads() == physical_cores()
    assert ServeSettings(model_id="m", num_threads=3).resolve_num_threads() == 3
    with pytest.raises(ValueError, match="num_threads"):
        ServeSettings(model_id="m", num_threads=0)
    assert "--num-threads" in runner.invoke(app, ["serve", "--help"], terminal_width=200).output


# ---- item 6: a KV cache too small for max_total_tokens ------------------------------------------------


def load(llama_dir, **settings):
    options = {**ENGINE_ARGS, "num_threads": 1, "device": "cpu", **settings}
    return create_app(ServeSettings(model_id=str(llama_dir), **options), str(llama_dir), load_in_background=False)


def test_max_total_tokens_beyond_the_kv_cache_is_refused(llama_dir):
    small = {"kv_cache_bytes": 512 * 64, "block_size": 4}  # 64 slots of 512 bytes (the test model's KV per token)
    with pytest.raises(ValueError, match="does not fit the KV cache.*--kv-cache-bytes"):
        load(llama_dir, max_total_tokens=200, **small)
    app_ = load(llama_dir, **small)  # unset: capped at what the cache holds, and /info says so
    state = app_.state.tgi
    try:
        engine = state.service.engine
        slots = engine.block_manager.num_blocks * engine.config.block_size
        info = state.info()
        ahead = max(engine.k_max, engine.config.space.max_tree_depth if engine.planned else 0)  # a step's reserve
        assert info["max_total_tokens"] == slots - ahead < engine.model_config.max_model_len
        assert info["max_input_tokens"] == info["max_total_tokens"] - 1
    finally:
        state.service.worker.stop()
