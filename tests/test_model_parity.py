"""Logit parity with transformers' own implementation, on random checkpoints of each family."""

from __future__ import annotations

import pytest
import torch

from tests.checkpoints import save_checkpoint
from tgi_space.engine import Engine
from tgi_space.config import EngineConfig
from tgi_space.space import SeqPlan, build_layout

FAMILIES = ["llama", "llama3", "mistral", "qwen2"]


def engine_logits(engine: Engine, tokens: list[int], prefill_len: int) -> torch.Tensor:
    """Our logits for every position: prefill of the first part, then one token per step."""
    bm = engine.block_manager
    bm.allocate(0, len(tokens))
    out = []
    start, stop = 0, prefill_len
    while start < len(tokens):
        plan = SeqPlan(chain=tokens[start:stop], num_candidates=len(tokens[start:stop]) - 1,
                       anchors=[], group_size=0, num_cached=start)
        layout = build_layout([plan], 0)
        prefix = [bm.slots(0, 0, start)]
        writes = bm.slots(0, start, stop)
        out.append(engine._forward(layout, prefix, writes, torch.arange(stop - start)))
        start, stop = stop, stop + 1
    bm.free(0)
    return torch.cat(out)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(tmp_path, family):
    hf = save_checkpoint(tmp_path, family, seed=3)
    engine = Engine(EngineConfig(model_dir=str(tmp_path), dtype="float32", kv_cache_bytes=2**22, block_size=4))
    tokens = torch.randint(4, 90, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0].float()
    ours = engine_logits(engine, tokens, prefill_len=23)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_bfloat16_checkpoint_loads_and_is_close(tmp_path):
    hf = save_checkpoint(tmp_path, "llama", seed=4)
    engine = Engine(EngineConfig(model_dir=str(tmp_path), dtype="bfloat16", kv_cache_bytes=2**22))
    tokens = list(range(5, 30))
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0].float()
    ours = engine_logits(engine, tokens, prefill_len=10)
    assert (ours - ref).abs().max() < 0.1  # bf16 rounding only


def test_sharded_checkpoint_loads(tmp_path):
    hf = save_checkpoint(tmp_path / "full", "qwen2", seed=5)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "sharded" / name).write_bytes((tmp_path / "full" / name).read_bytes())
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    engine = Engine(EngineConfig(model_dir=str(tmp_path / "sharded"), dtype="float32", kv_cache_bytes=2**22))
    tokens = list(range(5, 20))
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0].float()
    torch.testing.assert_close(engine_logits(engine, tokens, 15), ref, atol=1e-4, rtol=0)
