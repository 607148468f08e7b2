"""TGI's request validation (`router/src/validation.rs`): same order, same messages, 422 on failure."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from tgi_space.engine import Engine
from tgi_space.http.errors import validation_error
from tgi_space.http.schemas import GenerateParameters
from tgi_space.http.tokenizing import TokenizerPool, encode_ids
from tgi_space.sampling import MAX_SCALE, MIN_SCALE, SamplingParams


@dataclass(frozen=True)
class Limits:
    """The router limits a request is checked against (also what `/info` reports)."""

    max_best_of: int
    max_stop_sequences: int
    max_top_n_tokens: int
    max_input_tokens: int
    max_total_tokens: int


@dataclass
class ValidRequest:
    """A request ready for the engine."""

    input_ids: list[int]
    params: SamplingParams
    best_of: int
    seed: int | None  # reported in details; None when decoding is greedy


def validate(
    engine: Engine, limits: Limits, inputs: str, p: GenerateParameters, add_special_tokens: bool = True,
    tokenizers: TokenizerPool | None = None,
) -> ValidRequest:
    """Check `p` in TGI's order and build SamplingParams; raises ApiError(422) with TGI's message.

    Blocking (tokenizes): call it on a thread. `tokenizers` sends large inputs to worker processes.
    """
    best_of = _check_best_of(p, limits)
    sampling = p.do_sample or any(v is not None for v in (p.temperature, p.top_k, p.top_p, p.typical_p))
    if best_of > 1 and not sampling:
        raise validation_error("you must use sampling when `best_of` is > 1")
    _check_ranges(p)
    if len(p.stop) > limits.max_stop_sequences:
        raise validation_error(f"`stop` supports up to {limits.max_stop_sequences} stop sequences. Given: {len(p.stop)}")
    if p.seed is not None and best_of > 1:
        raise validation_error("`seed` must not be set when `best_of` > 1")
    top_n = p.top_n_tokens or 0
    if top_n > limits.max_top_n_tokens:
        raise validation_error(f"`top_n_tokens` must be >= 0 and <= {limits.max_top_n_tokens}. Given: {top_n}")
    if not inputs:
        raise validation_error("`inputs` cannot be empty")
    if p.truncate is not None and (p.truncate == 0 or p.truncate > limits.max_input_tokens):
        raise validation_error(
            f"`truncate` must be strictly positive and less than {limits.max_input_tokens}. Given: {p.truncate}"
        )
    if tokenizers is None:
        num_ids, ids = encode_ids(engine.tokenizer, inputs, add_special_tokens, p.truncate, limits.max_input_tokens)
    else:
        num_ids, ids = tokenizers.encode(inputs, add_special_tokens, p.truncate, limits.max_input_tokens)
    max_new = _check_lengths(num_ids, p.max_new_tokens, limits)  # raises when ids is None (too many)
    _check_unsupported(p)
    try:
        params = _sampling_params(p, max_new, top_n)
        engine.validate_request(ids, params, "none")
    except ValueError as err:
        raise validation_error(str(err)) from None
    seed = None if params.is_greedy else params.seed
    return ValidRequest(ids, params, best_of, seed)


def _check_best_of(p: GenerateParameters, limits: Limits) -> int:
    best_of = 1 if p.best_of is None else p.best_of
    if limits.max_best_of == 1 and best_of != 1:
        raise validation_error("`best_of` != 1 is not allowed for this endpoint")
    if best_of == 0 or best_of > limits.max_best_of:
        raise validation_error(f"`best_of` must be > 0 and <= {limits.max_best_of}. Given: {best_of}")
    return best_of


def _check_ranges(p: GenerateParameters) -> None:
    """The sampling parameters' ranges, with TGI's messages (note `top_p` and `typical_p` exclude 1.0).

    Beyond TGI: every float must be finite, and `temperature` / `repetition_penalty` must lie in
    [MIN_SCALE, MAX_SCALE], where float32 logits divided by them cannot overflow into NaN.
    """
    for name in ("temperature", "repetition_penalty", "frequency_penalty", "top_p", "typical_p"):
        value = getattr(p, name)
        if value is not None and not math.isfinite(value):
            raise validation_error(f"`{name}` must be a finite number. Given: {value}")
    if p.temperature is not None and p.temperature <= 0:
        raise validation_error("`temperature` must be strictly positive")
    if p.repetition_penalty is not None and p.repetition_penalty <= 0:
        raise validation_error("`repetition_penalty` must be strictly positive")
    for name in ("temperature", "repetition_penalty"):
        value = getattr(p, name)
        if value is not None and not MIN_SCALE <= value <= MAX_SCALE:
            raise validation_error(f"`{name}` must be >= {MIN_SCALE:g} and <= {MAX_SCALE:g}. Given: {value:g}")
    if p.frequency_penalty is not None and not -2.0 <= p.frequency_penalty <= 2.0:
        raise validation_error("`frequency_penalty` must be >= -2.0 and <= 2.0")
    if p.top_p is not None and not 0.0 < p.top_p < 1.0:
        raise validation_error("`top_p` must be > 0.0 and < 1.0")
    if p.typical_p is not None and not 0.0 < p.typical_p < 1.0:
        raise validation_error("`typical_p` must be > 0.0 and < 1.0")
    if p.top_k is not None and p.top_k <= 0:
        raise validation_error("`top_k` must be strictly positive")
    if p.max_new_tokens == 0:
        raise validation_error("`max_new_tokens` must be strictly positive")


def _check_lengths(input_length: int, max_new_tokens: int | None, limits: Limits) -> int:
    """max_new_tokens (default: what max_total_tokens leaves, as TGI 3) after the length checks."""
    max_new = max_new_tokens if max_new_tokens is not None else max(1, limits.max_total_tokens - input_length)
    if input_length + max_new > limits.max_total_tokens:
        raise validation_error(
            f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
            f"Given: {input_length} `inputs` tokens and {max_new} `max_new_tokens`"
        )
    if input_length > limits.max_input_tokens:
        raise validation_error(f"`inputs` must have less than {limits.max_input_tokens} tokens. Given: {input_length}")
    return max_new


def _check_unsupported(p: GenerateParameters) -> None:
    """Features TGI has and this server does not: a clear 422 rather than a silent ignore."""
    if p.grammar is not None:
        raise validation_error("grammar is not supported")
    if p.watermark:
        raise validation_error("`watermark` is not supported by tgi-space")
    if p.adapter_id is not None:
        raise validation_error("`adapter_id` is not supported by tgi-space (no LoRA adapters are loaded)")


def _sampling_params(p: GenerateParameters, max_new: int, top_n: int) -> SamplingParams:
    """TGI's defaults for unset fields; a random seed when sampling without one (reported back)."""
    params = SamplingParams(
        max_new_tokens=max_new,
        do_sample=p.do_sample,
        temperature=1.0 if p.temperature is None else p.temperature,
        top_k=p.top_k or 0,
        top_p=1.0 if p.top_p is None else p.top_p,
        typical_p=1.0 if p.typical_p is None else p.typical_p,
        repetition_penalty=1.0 if p.repetition_penalty is None else p.repetition_penalty,
        frequency_penalty=p.frequency_penalty or 0.0,
        stop=list(p.stop),
        top_n_tokens=top_n,
        prompt_logprobs=bool(p.decoder_input_details),
    )
    if not params.is_greedy:
        params.seed = p.seed if p.seed is not None else random.getrandbits(63)
    return params


def check_stream_request(best_of: int, decoder_input_details: bool) -> None:
    """The streaming-only rules of TGI's `/generate_stream`."""
    if best_of != 1:
        raise validation_error("`best_of` != 1 is not supported when streaming tokens")
    if decoder_input_details:
        raise validation_error("`decoder_input_details` == true is not supported when streaming tokens")
