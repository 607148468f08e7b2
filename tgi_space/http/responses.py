"""Response bodies of TGI's routes, as pydantic models: they document `/openapi.json`, the routes build plain dicts."""

from __future__ import annotations

from pydantic import BaseModel


class ErrorResponse(BaseModel):
    """TGI's `ErrorResponse`, the body of every 4xx/5xx."""

    error: str
    error_type: str


class Token(BaseModel):
    """A generated token; `logprob` is null where it is -inf (a token top_k/top_p removed)."""

    id: int
    text: str
    logprob: float | None
    special: bool
    space_step: int | None = None  # tgi-space: tokens with the same value came out of one forward step


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None


class SpaceStats(BaseModel):
    """tgi-space: this request's speculation figures."""

    num_steps: int
    mean_tokens_per_step: float
    drafted_by_position: list[int]
    accepted_by_position: list[int]


class BestOfSequence(BaseModel):
    generated_text: str
    finish_reason: str
    generated_tokens: int
    seed: int | None = None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = None


class Details(BaseModel):
    finish_reason: str
    generated_tokens: int
    seed: int | None = None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = None
    best_of_sequences: list[BestOfSequence] | None = None
    space: SpaceStats | None = None


class GenerateResponse(BaseModel):
    """`POST /generate`."""

    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: str
    generated_tokens: int
    seed: int | None = None
    input_length: int


class StreamResponse(BaseModel):
    """One server-sent event of `POST /generate_stream`; the last one has `generated_text`."""

    index: int
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None


class SimpleToken(BaseModel):
    """`POST /tokenize`: one token with byte offsets into the input."""

    id: int
    text: str
    start: int
    stop: int


class ChatTokenizeResponse(BaseModel):
    tokenize_response: list[SimpleToken]
    templated_text: str


class Info(BaseModel):
    """`GET /info` (TGI's fields, plus `speculate_mode` and `space_k_max`)."""

    model_id: str
    model_sha: str | None = None
    model_pipeline_tag: str | None = None
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int | None
    max_total_tokens: int | None
    validation_workers: int
    max_client_batch_size: int
    router: str
    version: str
    sha: str | None = None
    docker_label: str | None = None
    speculate_mode: str | None = None
    space_k_max: int | None = None
    speculation: dict | None = None  # the planned step: measured t(N) (ms), calibration, rows and tokens per step
