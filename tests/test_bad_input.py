"""Bad input raises ValueError naming the field and range, before anything is allocated."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.checkpoints import save_checkpoint
from tgi_space.config import CheckpointError, EngineConfig, SpacePolicy
from tgi_space.engine import SpaceUnavailable
from tgi_space.llm import LLM
from tgi_space.sampling import SamplingParams


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(str(llama_dir), kv_cache_bytes=2**22)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"typical_p": 0.0}, "typical_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"top_n_tokens": 100}, "top_n_tokens"),
    ],
)
def test_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def assert_rejected_cleanly(llm, prompts, params, match, speculate="space"):
    bm = llm.engine.block_manager
    free = bm.num_free_blocks
    with pytest.raises(ValueError, match=match):
        llm.generate(prompts, params, speculate=speculate)
    assert bm.num_free_blocks == free and not llm.engine.has_unfinished()


def test_token_ids_outside_vocabulary(llm):
    assert_rejected_cleanly(llm, [[1, 2, 3], [1, 96]], SamplingParams(), r"prompt token ids must be in \[0, 96\)")
    assert_rejected_cleanly(llm, [[1, -1]], SamplingParams(), "prompt token ids")


def test_empty_prompt(llm):
    assert_rejected_cleanly(llm, [[1], []], SamplingParams(), "prompt must contain at least one token")
    assert_rejected_cleanly(llm, [""], SamplingParams(), "prompt must contain at least one token")


def test_beyond_the_context(llm):
    assert_rejected_cleanly(llm, [[1] * 200], SamplingParams(max_new_tokens=57), r"max_new_tokens \(57\).*<= 256")


def test_unknown_speculate_mode(llm):
    assert_rejected_cleanly(llm, [[1, 2]], SamplingParams(), "speculate must be", speculate="medusa")


def test_space_on_a_model_without_mask_token(tmp_path):
    """The paper's fixed layout needs masks (suffix drafts serve such checkpoints: tests/test_tree.py)."""
    save_checkpoint(tmp_path, "llama", space=False)
    llm = LLM(str(tmp_path), kv_cache_bytes=2**22, space=SpacePolicy(planner=False))
    with pytest.raises(SpaceUnavailable, match="space_mask_token_id"):
        llm.generate([[1, 2]], SamplingParams(), speculate="space")
    assert llm.generate([[1, 2]], SamplingParams(max_new_tokens=3), speculate="none")[0].finish_reason


def test_checkpoint_without_config_or_weights(tmp_path, llama_dir):
    with pytest.raises(CheckpointError, match="no config.json"):
        LLM(str(tmp_path), kv_cache_bytes=2**22)
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(llama_dir / name, tmp_path / name)
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        LLM(str(tmp_path), kv_cache_bytes=2**22)


def test_unsupported_architecture(tmp_path, llama_dir):
    shutil.copytree(llama_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'gpt2' is not supported; allowed: llama, mistral, qwen2"):
        LLM(str(tmp_path / "m"), kv_cache_bytes=2**22)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"dtype": "int8"}, "dtype"), ({"attention_backend": "xformers"}, "attention_backend"),
     ({"block_size": 0}, "block_size"), ({"kv_cache_memory_fraction": 0.0}, "kv_cache_memory_fraction")],
)
def test_engine_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig(model_dir="x", **kwargs)


def test_space_policy_names_the_field():
    with pytest.raises(ValueError, match="k_max"):
        SpacePolicy(k_max=-1)
    with pytest.raises(ValueError, match="max_step_query_tokens"):
        SpacePolicy(max_step_query_tokens=0)
