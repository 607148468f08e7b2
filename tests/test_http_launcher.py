"""The launcher shim's argument handling and the shard dispatch, with fake TGI binaries on PATH."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tgi_space.launcher import shard, wrapper
from tgi_space.launcher.path import NotFound, next_on_path

FAKE = """#!/bin/sh
# records how it was called, as the real binary would be
python3 -c 'import json, os, sys; print(json.dumps({"argv": sys.argv[2:], "mode": os.environ.get("SPECULATE_MODE"), "exe": sys.argv[1]}))' "$0" "$@"
"""


def shim(folder: Path, name: str, entry: str) -> Path:
    """A console-script-like executable running `entry` (module:function) with this interpreter."""
    module, func = entry.split(":")
    path = folder / name
    path.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n")
    path.chmod(0o755)
    return path


def fake(folder: Path, name: str) -> Path:
    path = folder / name
    path.write_text(FAKE)
    path.chmod(0o755)
    return path


@pytest.fixture
def bins(tmp_path):
    """PATH = ours:tgi, with the launcher shim in ours and a fake real launcher in tgi."""
    ours, tgi = tmp_path / "ours", tmp_path / "tgi"
    ours.mkdir()
    tgi.mkdir()
    shim(ours, "text-generation-launcher", "tgi_space.launcher.wrapper:main")
    fake(tgi, "text-generation-launcher")
    return ours, tgi


def run(name: str, *args: str, env: dict | None = None, path: str | None = None):
    drop = ("SPECULATE_MODE", "TGI_SPACE_SPECULATE_MODE", wrapper.GUARD, "TGI_SPACE_SHARD")
    base = {k: v for k, v in os.environ.items() if k not in drop}
    # the venv's own bin holds the installed shim: keep it (and any real TGI) off the search path
    rest = [d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "text-generation-launcher").exists()]
    base["PATH"] = os.pathsep.join([path, *rest])
    proc = subprocess.run([name, *args], env={**base, **(env or {})}, capture_output=True, text=True, timeout=60)
    return proc, (json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else None)


def path_of(bins) -> str:
    return os.pathsep.join(str(b) for b in bins)


def test_flag_is_removed_and_passed_through_the_environment(bins):
    args = ["--model-id", "/repository", "--speculate-mode", "space", "--port", "80", "--max-input-tokens", "7"]
    proc, out = run("text-generation-launcher", *args, path=path_of(bins))
    assert proc.returncode == 0, proc.stderr
    assert out["argv"] == ["--model-id", "/repository", "--port", "80", "--max-input-tokens", "7"]
    assert out["mode"] == "space" and out["exe"] == str(bins[1] / "text-generation-launcher")


@pytest.mark.parametrize(
    "args,env,mode",
    [
        (["--speculate-mode=none"], {}, "none"),
        ([], {"SPECULATE_MODE": "none"}, "none"),
        (["--speculate-mode", "SPACE"], {"SPECULATE_MODE": "none"}, "space"),  # the flag wins, case-insensitive
        ([], {}, None),  # unset stays unset: the shard picks (space on a SPACE checkpoint)
        (["--speculate-mode", "sdsat"], {"SPECULATE_MODE": "space"}, "sdsat"),
        ([], {"TGI_SPACE_SPECULATE_MODE": "sdsat", "SPECULATE_MODE": "space"}, "sdsat"),  # the project's name wins
    ],
)
def test_mode_sources(bins, args, env, mode):
    proc, out = run("text-generation-launcher", "--json-output", *args, env=env, path=path_of(bins))
    assert proc.returncode == 0, proc.stderr
    assert out["argv"] == ["--json-output"] and out["mode"] == mode


def test_arguments_after_double_dash_untouched(bins):
    proc, out = run("text-generation-launcher", "--speculate-mode", "none", "--", "--speculate-mode", "x", path=path_of(bins))
    assert out["argv"] == ["--", "--speculate-mode", "x"] and out["mode"] == "none"


@pytest.mark.parametrize("args,env", [(["--speculate-mode", "medusa"], {}), (["--speculate-mode"], {}), ([], {"SPECULATE_MODE": "ngram"})])
def test_bad_mode_is_a_usage_error(bins, args, env):
    proc, _ = run("text-generation-launcher", *args, env=env, path=path_of(bins))
    assert proc.returncode == 2 and ("space, sdsat, none" in proc.stderr or "needs a value" in proc.stderr)


def test_no_real_launcher(tmp_path):
    ours = tmp_path / "only"
    ours.mkdir()
    shim(ours, "text-generation-launcher", "tgi_space.launcher.wrapper:main")
    proc, _ = run("text-generation-launcher", "--port", "80", path=str(ours))
    assert proc.returncode == 2 and "no text-generation-launcher on PATH" in proc.stderr


def test_guard_against_finding_itself_again():
    with pytest.raises(NotFound, match="ran twice"):
        wrapper.plan(["text-generation-launcher"], {wrapper.GUARD: "1", "PATH": ""})


def test_next_on_path_skips_earlier_and_same_files(tmp_path):
    dirs = [tmp_path / n for n in ("a", "b", "c")]
    for d in dirs:
        d.mkdir()
        fake(d, "tool")
    path = os.pathsep.join(map(str, dirs))
    assert next_on_path("tool", str(dirs[1] / "tool"), path) == str(dirs[2] / "tool")
    assert next_on_path("tool", str(tmp_path / "elsewhere"), path) == str(dirs[0] / "tool")


def test_shard_dispatch_choice(llama_dir, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg.pop("space_mask_token_id")
    (plain / "config.json").write_text(json.dumps(cfg))
    assert shard.choose(["serve", str(llama_dir), "--uds-path", "/tmp/x"], {}) == "space"
    assert shard.choose(["serve", str(plain)], {}) == "tgi"
    assert shard.choose(["download-weights", str(llama_dir)], {}) == "tgi"
    assert shard.choose(["serve", "some-org/not-cached-model"], {}) == "tgi"
    assert shard.choose(["serve", str(plain)], {"TGI_SPACE_SHARD": "space"}) == "space"


def test_shard_dispatch_execs_tgi_server_unchanged(tmp_path):
    ours, tgi = tmp_path / "ours", tmp_path / "tgi"
    ours.mkdir()
    tgi.mkdir()
    shim(ours, "text-generation-server", "tgi_space.launcher.shard:main")
    fake(tgi, "text-generation-server")
    args = ["download-weights", "bigscience/bloom-560m", "--extension", ".safetensors"]
    proc, out = run("text-generation-server", *args, path=f"{ours}{os.pathsep}{tgi}")
    assert proc.returncode == 0, proc.stderr
    assert out["argv"] == args and out["exe"] == str(tgi / "text-generation-server")
