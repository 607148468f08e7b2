"""Self-distillation data: prompt sampling, token-id JSONL records, and continuations equal to greedy decoding."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from tgi_space.cli import app
from tgi_space.train.data import DataError, load_examples
from tgi_space.train.distill import sample_prompts


def test_prompts_are_windows_of_the_documents_and_seeded():
    docs = [list(range(100, 140)), list(range(200, 205)), list(range(300, 360))]
    prompts = sample_prompts(docs, count=50, length=8, seed=3)
    assert prompts == sample_prompts(docs, count=50, length=8, seed=3)
    assert prompts != sample_prompts(docs, count=50, length=8, seed=4)
    for p in prompts:
        assert len(p) == 8
        assert p[0] // 100 != 2  # the 5-token document cannot hold a window of 8
        assert p == list(range(p[0], p[0] + 8))  # contiguous slice of one document


def test_no_document_long_enough_is_an_error():
    with pytest.raises(ValueError, match="--prompt-tokens 8"):
        sample_prompts([[1, 2, 3]], count=1, length=8, seed=0)


def test_id_records_supervise_the_response_only(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt_ids": [5, 6, 7], "response_ids": [8, 9, 10, 11]}) + "\n")
    (ex,) = load_examples([path], tokenizer=None, seq_len=64, k=2)
    assert ex.input_ids == [5, 6, 7, 8, 9, 10, 11]
    assert ex.is_target == [False] * 3 + [True] * 4


@pytest.mark.parametrize("bad", [{"prompt_ids": [1, "a"], "response_ids": [2]}, {"prompt_ids": [1], "response_ids": 5}])
def test_bad_id_records_name_the_field(tmp_path, bad):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(bad) + "\n")
    with pytest.raises(DataError, match="_ids' must be a list of non-negative token ids"):
        load_examples([path], tokenizer=None, seq_len=64, k=1)


def test_distill_writes_the_models_greedy_continuations(tmp_path, llama_dir):
    """Each response equals transformers' greedy generate() of the same model on the same prompt ids."""
    from transformers import AutoModelForCausalLM

    data = tmp_path / "docs"
    data.mkdir()
    for i in range(3):
        (data / f"{i}.txt").write_text(" ".join(f"w{4 + (i * 7 + j * 3) % 80}" for j in range(40)))
    out = tmp_path / "distilled.jsonl"
    args = ["distill", "--model", str(llama_dir), "--data", str(data), "--output", str(out), "--num-prompts", "5",
            "--prompt-tokens", "6", "--new-tokens", "10", "--batch-size", "2", "--dtype", "float32"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 5
    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    for r in records:
        assert len(r["prompt_ids"]) == 6
        ref = hf.generate(torch.tensor([r["prompt_ids"]]), max_new_tokens=10, do_sample=False, pad_token_id=0)
        expected = ref[0, 6:].tolist()
        if hf.config.eos_token_id in expected:  # both stop at EOS, which is kept as the last token
            expected = expected[: expected.index(hf.config.eos_token_id) + 1]
        assert r["response_ids"] == expected
