"""Reading SAR-SFT data: raw files, JSONL (prompt/response, messages), and bad input."""

from __future__ import annotations

import json

import pytest

from tests.test_train_support import tiny_tokenizer
from tgi_space.train.data import DataError, Example, SkipCounter, load_examples, pack_documents


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write_jsonl(path, records) -> str:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def test_raw_text_is_supervised_everywhere_with_bos(tmp_path, tok):
    (tmp_path / "a.py").write_text("def add(a, b):\n    return a + b\n")
    examples = load_examples([tmp_path], tok, seq_len=8, k=2)
    assert examples[0].input_ids[0] == tok.bos_token_id
    assert all(all(ex.is_target) for ex in examples)
    assert max(len(ex.input_ids) for ex in examples) == 8


def test_prompt_response_supervises_the_response_only(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "def add(a, b):\n", "response": "    return a + b\n"}])
    (ex,) = load_examples([path], tok, seq_len=64, k=2)
    prompt_len = 1 + len(tok("def add(a, b):\n", add_special_tokens=False)["input_ids"])
    assert ex.is_target == [False] * prompt_len + [True] * (len(ex.input_ids) - prompt_len)
    assert ex.input_ids[-1] == tok.eos_token_id
    assert tok.decode(ex.input_ids[prompt_len:-1]) == "    return a + b\n"


def test_messages_use_the_chat_template(tmp_path, tok):
    messages = [{"role": "user", "content": "add"}, {"role": "assistant", "content": "return a + b"}]
    (ex,) = load_examples([write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}])], tok, seq_len=128, k=2)
    response = [t for t, sup in zip(ex.input_ids, ex.is_target) if sup]
    assert tok.decode(response).rstrip("\n") == "return a + b</s>"
    assert not any(ex.is_target[: ex.is_target.index(True)])


def test_missing_file_is_an_error(tmp_path, tok):
    with pytest.raises(DataError, match="does not exist"):
        load_examples([tmp_path / "nope.jsonl"], tok, 64, 2)


def test_empty_file_is_an_error(tmp_path, tok):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_examples([tmp_path / "empty.jsonl"], tok, 64, 2)


def test_empty_directory_is_an_error(tmp_path, tok):
    with pytest.raises(DataError, match="no data files"):
        load_examples([tmp_path], tok, 64, 2)


def test_jsonl_line_without_fields_names_the_line(tmp_path, tok):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, {"text": "no fields"}])
    with pytest.raises(DataError, match="bad.jsonl:2: expected fields"):
        load_examples([path], tok, 64, 2)


def test_invalid_json_names_the_line(tmp_path, tok):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{not json\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        load_examples([tmp_path / "bad.jsonl"], tok, 64, 2)


def test_short_sequences_are_skipped_and_counted(tmp_path, tok):
    records = [
        {"prompt": "def add(a, b):", "response": "    return a + b\n" * 3},
        {"prompt": "def add(a, b):", "response": ""},  # only </s> is supervised
        {"prompt": "x", "response": "y"},  # 2 supervised tokens < k+1
    ]
    skips = SkipCounter()
    examples = load_examples([write_jsonl(tmp_path / "d.jsonl", records)], tok, 64, k=3, skips=skips)
    assert len(examples) == 1
    assert skips.total() == 2
    assert "2 shorter than k+1=4 supervised tokens" in skips.report()


def test_all_examples_too_short_is_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x", "response": "y"}])
    with pytest.raises(DataError, match="no usable examples"):
        load_examples([path], tok, 64, k=5)


def test_non_utf8_files_are_skipped_and_counted(tmp_path, tok):
    (tmp_path / "ok.py").write_text("def add(a, b):\n    return a + b\n")
    (tmp_path / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))
    skips = SkipCounter()
    load_examples([tmp_path], tok, 64, 2, skips)
    assert skips.counts["files not UTF-8"] == 1


def test_pack_documents_windows():
    examples = pack_documents([[1, 2, 3], [4, 5, 6, 7]], seq_len=3)
    assert [ex.input_ids for ex in examples] == [[1, 2, 3], [4, 5, 6]]  # the trailing [7] is too short


def test_example_lengths_must_agree():
    with pytest.raises(ValueError):
        Example([1, 2], [True])
