"""Incremental detokenization: the text each new token adds, so streamed pieces concatenate to the output."""

from __future__ import annotations

from tgi_space.tokenizer import Tokenizer


class DecodeStream:
    """Prefix/read offsets over the generated ids (the scheme of TGI's `decode_token`).

    A token's text is `decode(ids[prefix:]) - decode(ids[prefix:read])`, so word-piece
    spacing and multi-token characters come out right; an incomplete UTF-8 character
    (U+FFFD at the end) yields "" until the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer, context: list[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(context or [])[-5:]  # a little prompt context for leading spaces
        self.prefix = 0
        self.read = len(self.ids)

    def step(self, token_id: int) -> str:
        """Text added by token_id (special tokens included, as TGI's token texts)."""
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=False)
        after = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=False)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            piece = after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
            return piece
        return ""
