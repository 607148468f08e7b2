"""`text-generation-server` as the launcher runs it: argv, environment, refusals, logs, readiness."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.router_emulation import EmuRequest, RouterEmulation
from tgi_space.server import cli
from tgi_space.server.options import ServeOptions

runner = CliRunner()


def launcher_argv(model_dir, uds_path="/tmp/text-generation-server", *extra) -> list[str]:
    """`serve` exactly as launcher/src/main.rs builds it (flags in its order)."""
    return ["serve", str(model_dir), "--uds-path", str(uds_path), "--logger-level", "INFO", "--json-output",
            *extra, "--otlp-service-name", "text-generation-inference.router"]


def launcher_env(**extra) -> dict[str, str]:
    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500",
           "TORCH_NCCL_AVOID_RECORD_STREAMS": "1", "CUDA_MEMORY_FRACTION": "1", "SAFETENSORS_FAST_GPU": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_ENABLE_HF_TRANSFER": "1", "CUDA_GRAPHS": "1,2,4,8,16,32",
           "ATTENTION": "paged", "PREFIX_CACHING": "0", "MAX_TOTAL_TOKENS": "128", "MAX_BATCH_SIZE": "8",
           "WATERMARK_GAMMA": "0.3", "WATERMARK_DELTA": "1.5"}
    env.update(extra)
    return env


@pytest.fixture
def captured(monkeypatch):
    """run_server replaced: the options are recorded and no model is loaded."""
    seen: list[ServeOptions] = []
    monkeypatch.setattr(cli, "run_server", seen.append)
    monkeypatch.setattr(cli, "_cuda_available", lambda: False)
    return seen


def json_lines(output: str) -> list[dict]:
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]
    for line in lines:
        assert line["text"].endswith("\n") and line["record"]["level"]["name"] in (
            "TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")
    return lines


def test_launcher_argv_and_env_are_accepted(llama_dir, captured, monkeypatch):
    for key, value in launcher_env().items():
        monkeypatch.setenv(key, value)
    argv = launcher_argv(llama_dir, "/tmp/tgi-test", "--speculate", "2", "--dtype", "bfloat16",
                         "--revision", "main", "--otlp-endpoint", "http://collector:4317", "--max-input-tokens",
                         "100", "--some-future-flag", "on", "--no-trust-remote-code")
    result = runner.invoke(cli.app, argv)
    assert result.exit_code == 0, result.output
    (opts,) = captured
    assert (opts.model_dir, opts.socket_path) == (str(llama_dir), "/tmp/tgi-test-0")
    assert opts.urls() == ["unix:///tmp/tgi-test-0"]
    assert (opts.k, opts.speculate_mode, opts.dtype, opts.device) == (2, "space", "bfloat16", "cpu")
    assert (opts.max_batch_size, opts.max_input_tokens) == (8, 100)
    assert (opts.watermark.gamma, opts.watermark.delta) == (0.3, 1.5)
    texts = " ".join(line["text"] for line in json_lines(result.stdout))
    assert "--some-future-flag on" in texts and "--otlp-endpoint" in texts


@pytest.mark.parametrize(
    "extra, env, message",
    [
        (["--quantize", "gptq"], {}, "--quantize gptq"),
        (["--quantize", "bitsandbytes-nf4"], {}, "quantized"),
        (["--kv-cache-dtype", "fp8_e5m2"], {}, "--kv-cache-dtype"),
        (["--sharded"], {"WORLD_SIZE": "2"}, "--sharded"),
        ([], {"WORLD_SIZE": "2", "RANK": "1"}, "WORLD_SIZE=2"),
        ([], {"LORA_ADAPTERS": "org/adapter"}, "LORA_ADAPTERS"),
        ([], {"ROPE_SCALING": "dynamic"}, "ROPE_SCALING"),
        ([], {"SPECULATE_MODE": "medusa"}, "SPECULATE_MODE"),
        (["--dtype", "float8"], {}, "--dtype"),
        ([], {"TGI_SPACE_SUFFIX_SHARED_TOKENS": "many"}, "TGI_SPACE_SUFFIX_SHARED_TOKENS"),
        ([], {"PREFILL_CHUNKING": "maybe"}, "PREFILL_CHUNKING"),
        ([], {"TGI_SPACE_SURVIVAL_CALIBRATION": "yes"}, "TGI_SPACE_SURVIVAL_CALIBRATION"),
        ([], {"TGI_SPACE_METRICS_PORT": "nine"}, "TGI_SPACE_METRICS_PORT"),
        ([], {"TGI_SPACE_METRICS_PORT": "70000"}, "TGI_SPACE_METRICS_PORT"),
    ],
)
def test_unsupported_options_are_refused_clearly(llama_dir, captured, monkeypatch, extra, env, message):
    for key, value in launcher_env(**env).items():
        monkeypatch.setenv(key, value)
    result = runner.invoke(cli.app, launcher_argv(llama_dir, "/tmp/tgi-test", *extra))
    assert result.exit_code == 1 and not captured
    errors = [line for line in json_lines(result.stdout) if line["record"]["level"]["name"] == "ERROR"]
    assert errors and message in errors[0]["text"]


def test_prefill_chunking_is_on_unless_its_variable_turns_it_off(llama_dir):
    from tgi_space.server.options import from_launcher

    assert from_launcher(str(llama_dir), env={}).prefill_chunking is True  # TGI's own default
    for off in ("0", "false", "FALSE"):
        assert from_launcher(str(llama_dir), env={"PREFILL_CHUNKING": off}).prefill_chunking is False
    assert from_launcher(str(llama_dir), env={"PREFILL_CHUNKING": "true"}).prefill_chunking is True


def test_survival_calibration_is_off_unless_its_variable_turns_it_on(llama_dir):
    from tgi_space.server.options import from_launcher

    assert from_launcher(str(llama_dir), env={}).engine_config().space.survival_calibration is False
    opts = from_launcher(str(llama_dir), env={"TGI_SPACE_SURVIVAL_CALIBRATION": "1"})
    assert opts.engine_config().space.survival_calibration is True


def test_the_shared_suffix_cache_is_off_unless_its_variable_sets_a_budget(llama_dir):
    from tgi_space.server.options import from_launcher

    assert from_launcher(str(llama_dir), env={}).engine_config().space.suffix_shared_tokens == 0
    opts = from_launcher(str(llama_dir), env={"TGI_SPACE_SUFFIX_SHARED_TOKENS": "2048"})
    assert opts.engine_config().space.suffix_shared_tokens == 2048


def test_speculate_mode_from_env_checkpoint_and_flag(llama_dir, tmp_path, captured, monkeypatch):
    monkeypatch.setenv("SPECULATE_MODE", "none")
    assert runner.invoke(cli.app, launcher_argv(llama_dir)).exit_code == 0
    monkeypatch.setenv("SPECULATE_MODE", "space")
    assert runner.invoke(cli.app, launcher_argv(llama_dir, "/tmp/x", "--speculate", "0")).exit_code == 0
    monkeypatch.delenv("SPECULATE_MODE")
    assert runner.invoke(cli.app, launcher_argv(llama_dir)).exit_code == 0
    assert [(o.speculate_mode, o.k) for o in captured] == [("none", None), ("none", None), ("space", None)]
    plain = tmp_path / "plain"  # no space_mask_token_id
    shutil.copytree(llama_dir, plain)
    cfg = json.loads((plain / "config.json").read_text())
    del cfg["space_mask_token_id"]
    (plain / "config.json").write_text(json.dumps(cfg))
    assert runner.invoke(cli.app, launcher_argv(plain)).exit_code == 0
    assert captured[-1].speculate_mode == "none"
    monkeypatch.setenv("SPECULATE_MODE", "space")
    result = runner.invoke(cli.app, launcher_argv(plain))
    assert result.exit_code == 1 and "space_mask_token_id" in result.stdout
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling.Custom"}
    (plain / "config.json").write_text(json.dumps(cfg))
    monkeypatch.delenv("SPECULATE_MODE")
    result = runner.invoke(cli.app, launcher_argv(plain, "/tmp/x", "--trust-remote-code"))
    assert result.exit_code == 1 and "never runs" in result.stdout


@pytest.mark.parametrize("level", ["TRACE", "DEBUG", "INFO", "WARN", "ERROR", "OFF"])
def test_every_launcher_log_level_is_accepted(llama_dir, captured, level):
    argv = launcher_argv(llama_dir)
    argv[argv.index("INFO")] = level
    assert runner.invoke(cli.app, argv).exit_code == 0


def test_download_weights(llama_dir, tmp_path, monkeypatch):
    argv = ["download-weights", str(llama_dir), "--extension", ".safetensors", "--logger-level", "INFO",
            "--json-output", "--merge-lora"]
    result = runner.invoke(cli.app, argv)
    assert result.exit_code == 0 and "already present" in result.stdout
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    result = runner.invoke(cli.app, ["download-weights", "meta-llama/Llama-3.1-8B", "--json-output"])
    assert result.exit_code == 1 and "no network" in json_lines(result.stdout)[-1]["text"]
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(llama_dir / "config.json", partial / "config.json")
    result = runner.invoke(cli.app, ["download-weights", str(partial), "--json-output"])
    assert result.exit_code == 1 and "tokenizer.json" in result.stdout and "*.safetensors" in result.stdout


def test_hub_id_resolves_from_a_local_hf_cache(llama_dir, tmp_path, captured, monkeypatch):
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    shutil.copytree(llama_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "hub"))
    assert runner.invoke(cli.app, launcher_argv("org/tiny")).exit_code == 0
    assert captured[0].model_dir == str(snapshot)


def test_real_cli_under_router_emulation(llama_dir, tmp_path):
    """The console script as the launcher spawns it: ready = socket file; JSON stdout; SIGTERM stops it."""
    base = tmp_path / "tgi"
    env = {**os.environ, **launcher_env(), "TGI_SPACE_KV_CACHE_BYTES": str(2**20), "TGI_SPACE_BLOCK_SIZE": "4"}
    exe = Path(sys.executable).with_name("text-generation-server")
    argv = [str(exe), *launcher_argv(llama_dir, base, "--speculate", "3", "--unknown-flag")]
    proc = subprocess.Popen(["nice", "-n", "15", *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.time() + 60
        while not Path(f"{base}-0").exists():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
            time.sleep(0.1)
        emu = RouterEmulation(f"{base}-0", str(llama_dir / "tokenizer.json"))
        emu.start()
        assert emu.info.speculate == 3 and emu.info.block_size == 4
        results = emu.run([EmuRequest(f"w{5 + i} w9 w{20 + 3 * i}", max_new_tokens=6 + i, arrival=i) for i in range(4)])
        emu.close()
        assert all(r.error is None and len(r.token_ids) >= 1 and r.generated_text is not None for r in results)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    lines = json_lines(out)
    texts = [line["text"] for line in lines]
    assert any(t.startswith(f"Server started at unix://{base}-0") for t in texts)
    assert any("--unknown-flag" in t for t in texts)
    assert not Path(f"{base}-0").exists()
