"""What a user reads matches what is there (issue 11, item 16)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_empty_log_files_at_the_repository_root():
    assert [p.name for p in ROOT.glob("*.log") if p.stat().st_size == 0] == []


def test_serving_doc_does_not_call_the_quoted_load_benchmark_unrun():
    readme, serving = (ROOT / "README.md").read_text(), (ROOT / "docs" / "serving.md").read_text()
    if "Serving under load (measured here)" in readme:
        load_section = serving[serving.index("### Load benchmark"):]
        assert "Not run yet" not in load_section.split("\n## ")[0]
        import json

        runs = json.loads((ROOT / "benchmarks" / "load.json").read_text())["runs"]
        for run in runs:  # the same measured figures as the README and benchmarks/load.json
            figure = f"{run['requests_per_s']:.1f}"
            assert figure in load_section and figure in readme, (run["speculate_mode"], figure)


def test_patches_readme_warns_that_the_server_script_is_replaced():
    text = (ROOT / "patches" / "README.md").read_text()
    assert "replaces TGI's `text-generation-server` script" in text


def test_make_gpu_check_skips_cleanly_without_a_gpu():
    import os
    import subprocess

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, whatever the machine has
    result = subprocess.run(["make", "-s", "-o", ".venv/.installed", "gpu-check"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "gpu-check: SKIPPED" in result.stdout and "sees no CUDA device" in result.stdout
