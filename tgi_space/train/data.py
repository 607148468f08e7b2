"""Training data for SAR-SFT: raw text/code files and chat/instruction JSONL.

Every example is a token sequence plus a per-token flag saying whether that
token is a training target (predicted from the tokens before it). Raw text is
supervised everywhere; chat data only on the response.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".json")


class DataError(ValueError):
    """Raised for data files that cannot be used at all (missing, empty, malformed)."""


@dataclass
class Example:
    """One training sequence: `input_ids[i]` is a target iff `is_target[i]`."""

    input_ids: list[int]
    is_target: list[bool]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.is_target):
            raise ValueError("input_ids and is_target must have the same length")


@dataclass
class SkipCounter:
    """Counts examples that were dropped, by reason, so the log can name them."""

    counts: Counter = field(default_factory=Counter)

    def skip(self, reason: str) -> None:
        """Record one skipped example."""
        self.counts[reason] += 1

    def total(self) -> int:
        """Number of skipped examples, all reasons together."""
        return sum(self.counts.values())

    def report(self) -> str:
        """One line for the log."""
        if not self.counts:
            return "no examples skipped"
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items()))
        return f"skipped {self.total()} examples: {parts}"


def valid_mask_starts(is_target: Sequence[bool], k: int) -> list[int]:
    """Starts `s` (s >= 1) such that y[s .. s+k] are all targets (SPACE.md section 1, step 2)."""
    n = len(is_target)
    starts = []
    run = 0  # length of the run of targets ending at index i
    for i in range(n):
        run = run + 1 if is_target[i] else 0
        s = i - k
        if s >= 1 and run >= k + 1:
            starts.append(s)
    return starts


def pack_documents(docs: Iterable[list[int]], seq_len: int, min_len: int = 2) -> list[Example]:
    """Concatenate token lists and cut them into windows of `seq_len` (raw text: all targets).

    The last, shorter window is kept if it has at least `min_len` tokens.
    """
    stream: list[int] = [t for doc in docs for t in doc]
    examples = []
    for start in range(0, len(stream), seq_len):
        window = stream[start : start + seq_len]
        if len(window) >= min_len:
            examples.append(Example(window, [True] * len(window)))
    return examples


def _special_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """([bos] or [], [eos] or []) for the tokenizer."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return bos, eos


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _chat_example(tokenizer: Any, messages: list[dict]) -> Example:
    """Render a conversation with the chat template; supervise the last (assistant) message."""
    if not messages or messages[-1].get("role") != "assistant":
        raise DataError("'messages' must end with an assistant message")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("'messages' data needs a tokenizer with a chat_template")
    prefix = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prefix):
        raise DataError("chat template output does not extend the prompt rendering")
    prompt_ids = _encode(tokenizer, prefix)
    response_ids = _encode(tokenizer, full[len(prefix) :])
    return Example(prompt_ids + response_ids, [False] * len(prompt_ids) + [True] * len(response_ids))


def _ids_example(record: dict) -> Example:
    """A `prompt_ids`/`response_ids` record (token ids, as `tgi-space distill` writes): supervise the response."""
    prompt, response = record["prompt_ids"], record["response_ids"]
    for name, ids in (("prompt_ids", prompt), ("response_ids", response)):
        if not isinstance(ids, list) or not all(isinstance(t, int) and t >= 0 for t in ids):
            raise DataError(f"'{name}' must be a list of non-negative token ids")
    return Example(prompt + response, [False] * len(prompt) + [True] * len(response))


def _record_example(tokenizer: Any, record: Any) -> Example:
    """One JSONL record (`prompt`/`response`, `prompt_ids`/`response_ids` or `messages`) -> Example."""
    if isinstance(record, dict) and "prompt_ids" in record and "response_ids" in record:
        return _ids_example(record)
    if isinstance(record, dict) and "messages" in record:
        return _chat_example(tokenizer, record["messages"])
    if isinstance(record, dict) and "prompt" in record and "response" in record:
        bos, eos = _special_ids(tokenizer)
        prompt_ids = bos + _encode(tokenizer, str(record["prompt"]))
        response_ids = _encode(tokenizer, str(record["response"])) + eos
        return Example(prompt_ids + response_ids, [False] * len(prompt_ids) + [True] * len(response_ids))
    raise DataError("expected fields 'prompt' and 'response', 'prompt_ids' and 'response_ids', or 'messages'")


def read_jsonl(path: Path, tokenizer: Any, seq_len: int, skips: SkipCounter) -> list[Example]:
    """Chat/instruction examples from a JSONL file, truncated to `seq_len`."""
    examples = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            example = _record_example(tokenizer, json.loads(line))
        except (json.JSONDecodeError, DataError) as err:
            raise DataError(f"{path}:{lineno}: {err}") from err
        examples.append(Example(example.input_ids[:seq_len], example.is_target[:seq_len]))
    return examples


def read_text(path: Path, tokenizer: Any, skips: SkipCounter) -> list[int] | None:
    """One raw text/code document as token ids with BOS/EOS, or None if not UTF-8."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        skips.skip("files not UTF-8")
        return None
    bos, eos = _special_ids(tokenizer)
    return bos + _encode(tokenizer, text) + eos


def _expand(paths: Sequence[str | Path]) -> list[Path]:
    """Files named directly, plus every file under a named directory (sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"data path does not exist: {p}")
        files.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    return files


def check_data_paths(paths: Sequence[str | Path]) -> None:
    """Every data path exists and together they hold at least one file (DataError naming what is wrong)."""
    if not _expand(paths):
        raise DataError(f"no data files found in {list(map(str, paths))}")


def load_examples(
    paths: Sequence[str | Path], tokenizer: Any, seq_len: int, k: int, skips: SkipCounter | None = None
) -> list[Example]:
    """Read all data files into examples that can host a mask block of `k`; count the rest."""
    skips = skips if skips is not None else SkipCounter()
    files = _expand(paths)
    if not files:
        raise DataError(f"no data files found in {list(map(str, paths))}")
    examples: list[Example] = []
    docs: list[list[int]] = []
    for f in files:
        if f.stat().st_size == 0:
            raise DataError(f"data file is empty: {f}")
        if f.suffix in JSONL_SUFFIXES:
            examples.extend(read_jsonl(f, tokenizer, seq_len, skips))
        elif (doc := read_text(f, tokenizer, skips)) is not None:
            docs.append(doc)
    examples.extend(pack_documents(docs, seq_len))
    kept = filter_short(examples, k, skips)
    log.info("loaded %d examples from %d files; %s", len(kept), len(files), skips.report())
    if not kept:
        raise DataError(f"no usable examples (each needs at least k+1={k + 1} supervised tokens); {skips.report()}")
    return kept


def filter_short(examples: Iterable[Example], k: int, skips: SkipCounter) -> list[Example]:
    """Keep examples with at least one valid mask start; count the others as skipped."""
    kept = []
    for ex in examples:
        if valid_mask_starts(ex.is_target, k):
            kept.append(ex)
        else:
            skips.skip(f"shorter than k+1={k + 1} supervised tokens")
    return kept
