"""What a step returns per request, as plain dataclasses; `to_pb()` converts at the gRPC edge."""

from __future__ import annotations

from dataclasses import dataclass, field

from tgi_space.sampling import FINISH_EOS, FINISH_LENGTH, FINISH_STOP

# The proto's FinishReason enum values (generate.v3).
FINISH_REASONS = {FINISH_LENGTH: 0, FINISH_EOS: 1, FINISH_STOP: 2}


@dataclass
class Tokens:
    """Parallel lists: entry i of each describes token i."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    is_special: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def to_pb(self, pb2):
        """generate.v3.Tokens."""
        return pb2.Tokens(ids=self.ids, logprobs=self.logprobs, texts=self.texts, is_special=self.is_special)


@dataclass
class GeneratedText:
    """The finished request's text and why it stopped."""

    text: str
    generated_tokens: int
    finish_reason: str  # "length" / "eos_token" / "stop_sequence"
    seed: int | None  # the sampling seed, None when greedy

    def to_pb(self, pb2):
        """generate.v3.GeneratedText."""
        msg = pb2.GeneratedText(
            text=self.text,
            generated_tokens=self.generated_tokens,
            finish_reason=FINISH_REASONS[self.finish_reason],
        )
        if self.seed is not None:
            msg.seed = self.seed
        return msg


@dataclass
class Generation:
    """One request's output of one step: every token the step accepted, in order."""

    request_id: int
    tokens: Tokens
    prefill_tokens: Tokens | None = None
    top_tokens: list[Tokens] | None = None  # one per token in `tokens` when top_n_tokens > 0
    generated_text: GeneratedText | None = None

    def to_pb(self, pb2):
        """generate.v3.Generation."""
        msg = pb2.Generation(request_id=self.request_id, tokens=self.tokens.to_pb(pb2))
        if self.prefill_tokens is not None:
            msg.prefill_tokens.CopyFrom(self.prefill_tokens.to_pb(pb2))
        if self.top_tokens:
            msg.top_tokens.extend(t.to_pb(pb2) for t in self.top_tokens)
        if self.generated_text is not None:
            msg.generated_text.CopyFrom(self.generated_text.to_pb(pb2))
        return msg
