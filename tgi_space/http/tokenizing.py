"""Tokenizing request text where it cannot stall the event loop.

Small inputs are tokenized on the calling (worker) thread. Large ones go to `validation_workers`
processes, like TGI's validation workers: `tokenizers` holds the GIL for long stretches on a
megabyte of text, so on a thread it would still starve the event loop (and `/health`).
This module imports neither torch nor FastAPI: it is what the worker processes load.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor

from tgi_space.tokenizer import Tokenizer

LARGE_INPUT_CHARS = 32_768  # above this, tokenize in a worker process

_tokenizer: Tokenizer | None = None  # the worker process's own copy, set by _load


def _load(model_dir: str) -> None:
    global _tokenizer
    _tokenizer = Tokenizer(model_dir)


def encode_ids(tok: Tokenizer, text: str, add_special_tokens: bool, truncate: int | None, max_ids: int) -> tuple[int, list[int] | None]:
    """(number of ids after truncation, the ids; None when more than max_ids, which only a length error needs)."""
    ids = tok.encode(text, add_special_tokens=add_special_tokens)
    if truncate:
        ids = ids[-truncate:]
    return len(ids), (ids if len(ids) <= max_ids else None)


def tokenize_json(tok: Tokenizer, text: str, add_special_tokens: bool, truncate: int | None) -> bytes:
    """TGI's `TokenizeResponse` as JSON bytes (encoded where it was computed)."""
    tokens = simple_tokens(tok, text, add_special_tokens)
    return json.dumps(tokens[-truncate:] if truncate else tokens, ensure_ascii=False, separators=(",", ":")).encode()


def simple_tokens(tok: Tokenizer, text: str, add_special_tokens: bool) -> list[dict]:
    """TGI's `SimpleToken`s: id, text, start and stop as byte offsets into `text` (linear in its length)."""
    enc = tok.hf.encode(text, add_special_tokens=add_special_tokens)
    tokens = []
    if add_special_tokens and tok.add_bos and tok.bos_token_id is not None and enc.ids[:1] != [tok.bos_token_id]:
        tokens.append({"id": tok.bos_token_id, "text": "", "start": 0, "stop": 0})
    to_bytes = ByteOffsets(text)
    for token_id, (start, stop) in zip(enc.ids, enc.offsets):
        tokens.append({"id": token_id, "text": text[start:stop], "start": to_bytes(start), "stop": to_bytes(stop)})
    return tokens


class ByteOffsets:
    """Character offset -> UTF-8 byte offset into `text`; O(distance) from the previous call, so linear overall."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.is_ascii = text.isascii()
        self.char, self.byte = 0, 0  # the last offset converted

    def __call__(self, char: int) -> int:
        if self.is_ascii:
            return char
        if char >= self.char:
            self.byte += len(self.text[self.char : char].encode("utf-8", "surrogatepass"))
        else:  # back a little (several byte-level tokens of one character share its offsets)
            self.byte -= len(self.text[char : self.char].encode("utf-8", "surrogatepass"))
        self.char = char
        return self.byte


def _encode_in_worker(text: str, add_special_tokens: bool, truncate: int | None, max_ids: int):
    return encode_ids(_tokenizer, text, add_special_tokens, truncate, max_ids)


def _tokenize_in_worker(text: str, add_special_tokens: bool, truncate: int | None) -> bytes:
    return tokenize_json(_tokenizer, text, add_special_tokens, truncate)


class TokenizerPool:
    """Blocking calls (run them on a thread): local for small inputs, a worker process for large ones."""

    def __init__(self, tokenizer: Tokenizer, model_dir: str, num_workers: int) -> None:
        self.tokenizer = tokenizer
        self.model_dir = model_dir
        self.num_workers = max(1, num_workers)
        self._pool: ProcessPoolExecutor | None = None  # started on the first large input
        self._lock = threading.Lock()

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    self.num_workers, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_load, initargs=(self.model_dir,),
                )
            return self._pool

    def encode(self, text: str, add_special_tokens: bool, truncate: int | None, max_ids: int):
        """See `encode_ids`."""
        if len(text) < LARGE_INPUT_CHARS:
            return encode_ids(self.tokenizer, text, add_special_tokens, truncate, max_ids)
        return self._executor().submit(_encode_in_worker, text, add_special_tokens, truncate, max_ids).result()

    def tokenize(self, text: str, add_special_tokens: bool, truncate: int | None) -> bytes:
        """See `tokenize_json`."""
        if len(text) < LARGE_INPUT_CHARS:
            return tokenize_json(self.tokenizer, text, add_special_tokens, truncate)
        return self._executor().submit(_tokenize_in_worker, text, add_special_tokens, truncate).result()

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
