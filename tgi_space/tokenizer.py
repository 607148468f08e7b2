"""Tokenizer of a checkpoint folder: `tokenizer.json` through `tokenizers`, plus its config."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HfTokenizer

from tgi_space.config import CheckpointError


class Tokenizer:
    """Encode/decode with the checkpoint's special tokens and chat template."""

    def __init__(self, model_dir: str | Path) -> None:
        folder = Path(model_dir)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"model_dir: no tokenizer.json in {model_dir}")
        self.hf = HfTokenizer.from_file(str(path))
        cfg_path = folder / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.bos_token_id = self.hf.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self.hf.token_to_id(self.eos_token) if self.eos_token else None
        template_file = folder / "chat_template.jinja"  # transformers 5 saves the template beside the config
        self.chat_template: str | None = self.config.get("chat_template") or (
            template_file.read_text() if template_file.is_file() else None
        )
        self.add_bos = bool(self.config.get("add_bos_token", False))

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (with added tokens)."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text, with BOS when the checkpoint asks for it."""
        ids = self.hf.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ids."""
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """Raw text of a single token (for per-token details)."""
        return self.hf.decode([token_id], skip_special_tokens=False)

    def is_special(self, token_id: int) -> bool:
        """Whether token_id is one of the tokenizer's special added tokens."""
        token = self.hf.id_to_token(token_id)
        return token is not None and token in self._special_tokens

    @property
    def _special_tokens(self) -> set[str]:
        if not hasattr(self, "_special_cache"):
            decoder = self.hf.get_added_tokens_decoder()
            self._special_cache = {t.content for t in decoder.values() if t.special}
        return self._special_cache


def _token_str(value) -> str | None:
    """tokenizer_config stores special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value
