"""The self-drafted datastore (tgi_space/datastore.py): built from the model's own greedy outputs, read-only
while serving, a source of suffix drafts that never changes an output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tgi_space.cli import app
from tgi_space.config import SpacePolicy
from tgi_space.datastore import (
    END, DatastoreError, corpus_prompts, datastore_path, function_heads, index_of, load, register_in_config,
    source_files, windows,
)
from tgi_space.drafters import SEPARATOR, SuffixIndex
from tgi_space.sampling import SamplingParams
from tgi_space.sequence import Sequence
from tgi_space.speculation import Speculator

MODEL = Path(__file__).resolve().parents[1] / "models" / "tiny-space-py"

SOURCE = '''import os


def add(a, b):
    """Return a + b."""
    return a + b


class C:
    async def run(self) -> None:
        pass
'''


def test_function_heads_are_def_lines_with_their_docstrings_and_some_context():
    heads = function_heads(SOURCE, context_chars=10)
    assert heads == [SOURCE[SOURCE.index("def add") - 10 : SOURCE.index("    return")],
                     SOURCE[SOURCE.index("    async def") - 10 : SOURCE.index("        pass")]]  # from the line start
    assert heads[0].endswith('def add(a, b):\n    """Return a + b."""\n')


def test_sources_leave_out_test_suites_and_installed_packages(tmp_path):
    for rel in ("a.py", "pkg/b.py", "test/c.py", "pkg/tests/d.py", "site-packages/e.py", "notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(SOURCE)
    assert [f.relative_to(tmp_path).as_posix() for f in source_files([tmp_path])] == ["a.py", "pkg/b.py"]
    assert len(corpus_prompts([tmp_path], 10, "function-heads", 0, seed=0)) == 4  # 2 heads x 2 files
    with pytest.raises(DatastoreError, match="prompts: unknown 'lines'; allowed: function-heads, windows"):
        corpus_prompts([tmp_path], 10, "lines", 0, seed=0)


def test_a_datastore_the_model_cannot_read_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "datastore.npy"
    np.save(path, np.array([5, 9000, END], dtype=np.int32))
    with pytest.raises(DatastoreError, match=r"datastore .*datastore.npy: token id 9000 is outside .*vocab_size 8192"):
        load(path, 8192)
    np.save(path, np.zeros((2, 2), dtype=np.int32))
    with pytest.raises(DatastoreError, match="expected a 1-D integer array"):
        load(path, 8192)


def test_which_datastore_is_loaded(tmp_path):
    (tmp_path / "d.npy").write_bytes(b"")
    assert datastore_path(tmp_path, None, "d.npy") == tmp_path / "d.npy"  # config.json's, relative to the model
    assert datastore_path(tmp_path, "none", "d.npy") is None  # switched off
    assert datastore_path(tmp_path, None, None) is None
    with pytest.raises(DatastoreError, match=r"config.json space_datastore: no such file .*other.npy"):
        datastore_path(tmp_path, None, "other.npy")
    with pytest.raises(DatastoreError, match=r"^datastore: no such file"):
        datastore_path(tmp_path, str(tmp_path / "x.npy"), "d.npy")


def test_no_match_runs_across_two_outputs():
    index = index_of(np.array([5, 6, 7, END, 5, 6, 9, 4, END], dtype=np.int32), max_n=4)
    assert SEPARATOR in index.tokens and -1 not in index.tokens
    assert index.lookup([1, 5, 6], 1, 8, 8) == (2, [[7], [9, 4]])  # oldest first, each cut at its output's end
    assert index.lookup([3, 4], 1, 8, 8) == (0, [])  # `4` ends an output: nothing followed it


def _sequence(tokens: list[int]) -> Sequence:
    return Sequence(0, tokens, SamplingParams(max_new_tokens=16), True, None)


def test_the_longest_match_drafts_and_a_tie_goes_to_the_requests_own_text():
    store = index_of(np.array([1, 2, 3, 4, 50, 51, END, 7, 8, 60, END], dtype=np.int32), max_n=8)
    spec = Speculator(SpacePolicy(drafters=("suffix",)), 0, lambda *a: 1e-3, max_batch=1, max_probe_rows=64,
                      datastore=store)
    seq = _sequence([9, 10, 11, 2, 3, 4])  # own text: no repeat; the datastore: `2 3 4` then 50 51
    tree = spec._suffix(seq)
    assert tree.tokens == [50, 51] and set(tree.sources) == {"datastore"}
    seq = _sequence([7, 8, 70, 71, 8])  # own text: `8` then 70 71 (one token), the datastore: `8` then 60 (one)
    assert spec._suffix(seq).tokens[0] == 70 and set(spec._suffix(seq).sources) == {"suffix"}
    seq = _sequence([8, 70, 5, 7, 8])  # the datastore matches `7 8` (two tokens), the own text `8` only
    assert spec._suffix(seq).tokens == [60]


def test_only_the_suffix_drafter_reads_the_datastore():
    store = SuffixIndex(8)
    assert Speculator(SpacePolicy(drafters=("masks",)), 4, lambda *a: 1e-3, 1, 64, store).datastore is None


@pytest.fixture(scope="module")
def bundled():
    from tgi_space.llm import LLM

    assert json.loads((MODEL / "config.json").read_text())["space_datastore"] == "datastore.npy"
    return LLM(str(MODEL), max_num_seqs=4, space=SpacePolicy(latency_curve={1: 0.01, 4096: 0.01}))


def test_the_bundled_datastore_drafts_accepted_tokens_and_outputs_stay_plain_decodings(bundled):
    """A pinned flat t(N), so the planner sends what the drafters propose whatever the machine's load; the
    reference is plain decoding of the same engine (the datastore is only read by drafters)."""
    from tgi_space.bench import humaneval_prompts

    prompts = humaneval_prompts(8)
    params = SamplingParams(max_new_tokens=64, ignore_eos=True)
    plain = [o.token_ids for o in bundled.generate(prompts, params, speculate="none")]
    for batch in (1, 4):
        got = [o.token_ids for i in range(0, 8, batch) for o in bundled.generate(prompts[i : i + batch], params)]
        assert got == plain, batch
    stats = bundled.engine.speculator.stats
    assert bundled.engine.speculator.info()["datastore_tokens"] == len(np.load(MODEL / "datastore.npy"))
    assert stats.accepted_by_drafter.get("datastore", 0) > 0 < stats.drafted_by_drafter["datastore"]


def test_the_datastore_command_writes_the_models_greedy_continuations(tmp_path, llama_dir):
    """Each stored output is transformers' greedy generate() of the same model on the same prompt."""
    from transformers import AutoModelForCausalLM

    from tgi_space.tokenizer import Tokenizer

    src = tmp_path / "src"
    src.mkdir()
    (src / "m.py").write_text(SOURCE)
    out = tmp_path / "store"
    args = ["datastore", "--model", str(llama_dir), "--source", str(src), "--tokens", "30", "--new-tokens", "6",
            "--context-chars", "8", "--batch-size", "2", "--out", str(out), "--no-register", "--dtype", "float32"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    tokens = np.load(out / "datastore.npy")
    outputs = [list(map(int, o)) for o in np.split(tokens, np.flatnonzero(tokens == END) + 1) if len(o)]
    assert all(o[-1] == END for o in outputs) and len(outputs) == 2  # the two function heads of m.py
    manifest = json.loads((out / "datastore.json").read_text())
    assert manifest["outputs"] == 2 and manifest["tokens"] == sum(len(o) - 1 for o in outputs)
    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    tok = Tokenizer(str(llama_dir))
    for prompt, stored in zip(corpus_prompts([src], 2, "function-heads", 8, seed=0), outputs):
        ids = tok.encode(prompt)
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0)[0, len(ids) :].tolist()
        if hf.config.eos_token_id in ref:  # both stop at EOS, kept as the last token
            ref = ref[: ref.index(hf.config.eos_token_id) + 1]
        assert stored[:-1] == ref
    assert "space_datastore" not in json.loads((llama_dir / "config.json").read_text())  # --no-register


def test_registering_names_the_file_relative_to_the_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    register_in_config(tmp_path, tmp_path / "datastore.npy")
    assert json.loads((tmp_path / "config.json").read_text())["space_datastore"] == "datastore.npy"


def test_the_shard_takes_its_datastore_from_the_environment():
    from tgi_space.server.options import from_launcher

    options = from_launcher(str(MODEL), env={"TGI_SPACE_DATASTORE": "none"})
    assert options.datastore == "none" and options.engine_config().datastore == "none"
    assert from_launcher(str(MODEL), env={}).engine_config().datastore is None  # config.json's


def test_windows_start_at_a_line_and_skip_short_files():
    import random

    text = "a\nbb\nccc\ndddd\n"
    cuts = {w for _ in range(20) for w in windows(text, 5, random.Random(_))}
    assert cuts <= {text[s : s + 5] for s in (0, 2, 5, 9)} and len(cuts) > 1
    assert windows("abc", 5, random.Random(0)) == []
