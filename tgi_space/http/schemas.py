"""Request bodies of TGI's router and its OpenAI routes (field names, types and defaults as `router/src/lib.rs`).

Types are strict, like serde: `"max_new_tokens": "20"` or `20.5` is a 422, not a coercion.
Unknown fields are ignored, like serde without `deny_unknown_fields`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

U32 = Annotated[int, Field(ge=0, le=2**32 - 1)]
U64 = Annotated[int, Field(ge=0, le=2**64 - 1)]
I32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class GenerateParameters(_Strict):
    """TGI's `GenerateParameters`; ranges are checked in `validation.py` with TGI's messages."""

    best_of: U32 | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: I32 | None = None
    top_p: float | None = None
    typical_p: float | None = None
    do_sample: bool = False
    max_new_tokens: U32 | None = None
    return_full_text: bool | None = None
    stop: list[str] = Field(default_factory=list)
    truncate: U32 | None = None
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    seed: U64 | None = None
    top_n_tokens: U32 | None = None
    grammar: Any | None = None
    adapter_id: str | None = None


def default_parameters() -> GenerateParameters:
    """TGI's `default_parameters()`: a request without `parameters` samples (`do_sample: true`)."""
    return GenerateParameters(do_sample=True)


class GenerateRequest(_Strict):
    """`POST /generate`, `/generate_stream`, `/tokenize`."""

    inputs: str
    parameters: GenerateParameters = Field(default_factory=default_parameters)


class CompatGenerateRequest(GenerateRequest):
    """`POST /`: a generate request with a `stream` switch."""

    stream: bool = False


class CompletionRequest(_Strict):
    """`POST /v1/completions` (TGI's `CompletionRequest`)."""

    model: str | None = None
    prompt: str | list[str]
    max_tokens: U32 | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    seed: U64 | None = None
    suffix: str | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: list[str] | None = None

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: str | list[str]) -> list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("Empty array detected. Do not use an empty array for the prompt.")
        return [value] if isinstance(value, str) else value


class MessageChunk(_Strict):
    """One part of a multi-part message content."""

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: dict[str, Any] | None = None


class Message(_Strict):
    """A chat message; content as a string or as text/image chunks (images become `![](url)`, as TGI)."""

    role: str
    content: str | list[MessageChunk] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        """The content flattened to text."""
        if isinstance(self.content, str):
            return self.content
        if self.content is None:
            return ""
        return "".join(c.text or "" if c.type == "text" else f"![]({(c.image_url or {}).get('url', '')})" for c in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    """`POST /v1/chat/completions` (TGI's `ChatRequest`)."""

    model: str | None = None
    messages: list[Message]
    frequency_penalty: float | None = None
    logit_bias: Any | None = None  # unused, as TGI
    logprobs: bool | None = None
    top_logprobs: U32 | None = None
    max_tokens: U32 | None = None
    max_completion_tokens: U32 | None = None
    n: U32 | None = None  # unused, as TGI
    presence_penalty: float | None = None
    stop: list[str] | None = None
    stream: bool = False
    seed: U64 | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] | None = None
    tool_prompt: str | None = None
    tool_choice: Any | None = None
    response_format: Any | None = None
    stream_options: StreamOptions | None = None

    @property
    def max_new_tokens(self) -> int | None:
        """`max_tokens`, or its newer alias `max_completion_tokens`."""
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens
