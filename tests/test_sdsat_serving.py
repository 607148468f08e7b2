"""SDSAT behind every front: the shard (SPECULATE_MODE, Info.speculate, the router's session), `serve`,
`generate`, and the training CLI's `--method sdsat --reuse-token-ids`."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
import torch
from typer.testing import CliRunner

from tests.inprocess_server import InProcessServer
from tests.router_emulation import InProcessShard
from tests.test_shard_cli import captured, launcher_argv  # noqa: F401 - the fixture
from tests.test_shard_server import K, assert_same, mixed_requests, offline, options
from tests.test_train_support import tiny_llama, tiny_tokenizer
from tests.test_train_trainer import model_dir, run_cli  # noqa: F401 - the fixture
from tgi_space.cli import app
from tgi_space.config import SpacePolicy
from tgi_space.llm import LLM
from tgi_space.sampling import SamplingParams
from tgi_space.server import cli as shard_cli
from tgi_space.server.options import ServeOptions, UnsupportedOption, from_launcher
from tgi_space.train.data import Example
from tgi_space.train.prepare import make_space_ready, unused_token_id

runner = CliRunner()


# ---- the shard ---------------------------------------------------------------------------------------------


def test_shard_mode_from_the_environment(llama_dir, tmp_path, captured, monkeypatch):  # noqa: F811
    for env in ({"SPECULATE_MODE": "sdsat"}, {"TGI_SPACE_SPECULATE_MODE": "sdsat", "SPECULATE_MODE": "space"}):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert runner.invoke(shard_cli.app, launcher_argv(llama_dir)).exit_code == 0
        assert captured[-1].speculate_mode == "sdsat"
        assert captured[-1].engine_config().space.speculate_mode == "sdsat"
    monkeypatch.setenv("TGI_SPACE_SDSAT_TREE_SIZES", "2,2")
    assert runner.invoke(shard_cli.app, launcher_argv(llama_dir, "/tmp/x", "--speculate", "0")).exit_code == 0
    assert captured[-1].speculate_mode == "none" and captured[-1].sdsat_tree_sizes == (2, 2)
    plain = tmp_path / "plain"
    shutil.copytree(llama_dir, plain)
    cfg = json.loads((plain / "config.json").read_text())
    del cfg["space_mask_token_id"]
    (plain / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedOption, match="SPECULATE_MODE=sdsat.*space_mask_token_id"):
        from_launcher(str(plain), env={"SPECULATE_MODE": "sdsat"})
    with pytest.raises(UnsupportedOption, match="TGI_SPACE_SDSAT_TREE_SIZES"):
        from_launcher(str(llama_dir), env={"TGI_SPACE_SDSAT_TREE_SIZES": "4,x"})


@pytest.fixture(scope="module")
def sdsat_shard(llama_dir, tmp_path_factory):
    server = InProcessShard(ServeOptions(**{**options(llama_dir, tmp_path_factory.mktemp("sock") / "tgi").__dict__,
                                            "speculate_mode": "sdsat", "planner": True,
                                            "latency_curve": {1: 0.005, 512: 0.005}}))  # pinned: SDSAT every step
    yield server
    server.stop()


def test_greedy_sdsat_shard_equals_offline_plain_decoding(sdsat_shard, llama_dir):
    llm = LLM(str(llama_dir), dtype="float32", kv_cache_bytes=2**22, block_size=4, space=SpacePolicy(k_max=K))
    requests = mixed_requests()
    emu = sdsat_shard.router()
    assert emu.info.speculate == K  # the longest path a verify pass accepts
    results = emu.run(requests)
    assert_same(results, offline(llm, emu, requests))
    info = sdsat_shard.shard.engine.sdsat.info()
    assert info["draft_passes"] > 10 and info["verify_passes"] > 10
    assert sdsat_shard.shard.cache == {}
    emu.close()


def test_shard_refuses_sdsat_beyond_the_trained_k(llama_dir, tmp_path):
    opts = ServeOptions(**{**options(llama_dir, tmp_path / "tgi").__dict__, "speculate_mode": "sdsat", "k": K + 2})
    with pytest.raises(ValueError, match="space_k"):
        InProcessShard(opts)


# ---- `tgi-space serve` and `tgi-space generate` ------------------------------------------------------------


def test_serve_takes_speculate_sdsat(llama_dir, monkeypatch):
    seen = {}

    def fake_create_app(settings, model_dir):
        seen["settings"] = settings
        raise SystemExit(0)

    monkeypatch.setattr("tgi_space.http.app.create_app", fake_create_app)
    result = runner.invoke(app, ["serve", "--model", str(llama_dir), "--speculate", "sdsat", "--sdsat-tree-sizes", "4,4",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (seen["settings"].speculate_mode, seen["settings"].sdsat_tree_sizes) == ("sdsat", (4, 4))
    result = runner.invoke(app, ["serve", "--model", str(llama_dir), "--device", "cpu"],
                           env={"TGI_SPACE_SPECULATE_MODE": "sdsat"})
    assert result.exit_code == 0 and seen["settings"].speculate_mode == "sdsat"
    bad = runner.invoke(app, ["serve", "--model", str(llama_dir), "--speculate", "medusa", "--device", "cpu"])
    assert bad.exit_code == 2 and "speculate_mode must be one of space, sdsat, none" in bad.output


def test_served_sdsat_reports_details_info_and_metrics(llama_dir):
    server = InProcessServer(llama_dir, speculate_mode="sdsat").start()
    try:
        body = {"inputs": "w5 w6 w7 w8 w5 w6 w7", "parameters": {"max_new_tokens": 12, "details": True}}
        out = httpx.post(server.url + "/generate", json=body, timeout=60).json()
        info = httpx.get(server.url + "/info", timeout=10).json()
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
    finally:
        server.state.service.worker.stop()
        server.stop()
    assert info["speculate_mode"] == "sdsat" and info["speculation"]["sdsat"]["draft_passes"] >= 1
    space = out["details"]["space"]
    assert space["num_steps"] >= 2 and len(space["drafted_by_position"]) >= 1
    assert "tgi_space_tokens_per_step_bucket" in metrics
    llm = LLM(str(llama_dir), kv_cache_bytes=2**24, block_size=4)
    plain = llm.generate("w5 w6 w7 w8 w5 w6 w7", SamplingParams(max_new_tokens=12), speculate="none")[0]
    assert [t["id"] for t in out["details"]["tokens"]] == plain.token_ids


def test_generate_cli_with_sdsat(llama_dir):
    result = runner.invoke(app, ["generate", "--model", str(llama_dir), "--speculate", "sdsat", "--max-new-tokens", "8",
                                 "--dtype", "float32", "--json", "w5 w6 w7"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.strip().splitlines()[-1])
    assert record["generated_tokens"] == 8 and record["forward_steps"] >= 2


# ---- training: --method sdsat, --reuse-token-ids ------------------------------------------------------------


def test_unused_token_id_is_the_highest_id_never_in_the_data_and_not_special():
    tok = tiny_tokenizer()
    top = len(tok) - 1
    examples = [Example([5, 6, top], [True] * 3)]
    assert unused_token_id(tok, examples, len(tok)) == top - 1
    assert unused_token_id(tok, [Example(list(range(len(tok))), [True] * len(tok))], len(tok)) is None
    assert unused_token_id(tok, [Example(list(range(3, len(tok))), [True] * (len(tok) - 3))], len(tok)) is None  # specials


def test_make_space_ready_reuses_a_row_mean_initialised():
    tok = tiny_tokenizer()
    model = tiny_llama(vocab=len(tok))
    rows = model.get_input_embeddings().weight.shape[0]
    mask_id = make_space_ready(model, tok, k=3, method="sdsat", token_id=rows - 2)
    weight = model.get_input_embeddings().weight
    assert mask_id == rows - 2 and weight.shape[0] == rows  # no new row
    others = torch.cat([weight[:mask_id], weight[mask_id + 1 :]]).detach()
    assert weight[mask_id].detach().allclose(others.mean(0), atol=1e-6)
    assert (model.config.space_mask_token_id, model.config.space_k, model.config.space_method) == (mask_id, 3, "sdsat")
    with pytest.raises(ValueError, match="method must be one of"):
        make_space_ready(model, tok, k=3, method="medusa")


@pytest.mark.parametrize("reuse", [False, True])
def test_train_cli_method_sdsat(tmp_path, model_dir, reuse):  # noqa: F811
    data = tmp_path / "code.py"
    data.write_text("def add(a, b):\n    return a + b\n" * 20)
    out = tmp_path / "out"
    args = ["--model", str(model_dir), "--data", str(data), "--output", str(out), "--k", "3", "--max-steps", "2",
            "--seq-len", "32", "--batch-size", "2", "--no-bf16", "--save-steps", "2", "--lr", "1e-3", "--method", "sdsat"]
    result = run_cli(args + (["--reuse-token-ids"] if reuse else []))
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["space_method"] == "sdsat" and config["space_k"] == 3
    base_vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    if reuse:  # an existing row, and the tokenizer is unchanged
        assert config["space_mask_token_id"] < base_vocab == config["vocab_size"]
        assert "[MASK]" not in (out / "tokenizer.json").read_text()
    else:
        assert config["space_mask_token_id"] == base_vocab == config["vocab_size"] - 1
    served = LLM(str(out), dtype="float32", kv_cache_bytes=2**22)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    sdsat = served.generate([[5, 6, 7]], params, speculate="sdsat")[0]
    assert sdsat.token_ids == served.generate([[5, 6, 7]], params, speculate="none")[0].token_ids


def test_train_cli_refuses_an_unknown_method(tmp_path, model_dir):  # noqa: F811
    data = tmp_path / "code.py"
    data.write_text("x = 1\n" * 50)
    result = run_cli(["--model", str(model_dir), "--data", str(data), "--output", str(tmp_path / "o"), "--method", "eagle"])
    assert result.exit_code == 2 and "--method must be one of space, sdsat" in result.output
