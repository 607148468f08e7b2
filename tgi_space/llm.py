"""Offline API: `LLM(model_dir).generate(prompts, SamplingParams(...), speculate=...)`."""

from __future__ import annotations

from dataclasses import dataclass, field

from tgi_space.config import EngineConfig, SpacePolicy
from tgi_space.engine import Engine
from tgi_space.sampling import SamplingParams
from tgi_space.sequence import SeqStats, TokenInfo


@dataclass
class RequestOutput:
    """Result of one prompt."""

    prompt: str | list[int]
    text: str
    token_ids: list[int]
    finish_reason: str
    tokens: list[TokenInfo] = field(default_factory=list)  # per-token logprobs, top-n, step index
    stats: SeqStats = field(default_factory=SeqStats)


class LLM:
    """A model ready to generate; engine options are EngineConfig's fields."""

    def __init__(self, model_dir: str, space: SpacePolicy | None = None, **engine_options) -> None:
        config = EngineConfig(model_dir=str(model_dir), space=space or SpacePolicy(), **engine_options)
        self.engine = Engine(config)
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        speculate: str | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids), batched; outputs in prompt order.

        speculate: "space", "sdsat" or "none"; None: the policy's speculate_mode ("space" by default).
        """
        prompts = _as_list(prompts)
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"params: got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        ids = [p if isinstance(p, list) else self.tokenizer.encode(p) for p in prompts]
        for prompt_ids, p in zip(ids, params_list):  # all checks before anything is queued
            self.engine.validate_request(prompt_ids, p, speculate)
        seqs = [self.engine.add_request(i, p, speculate) for i, p in zip(ids, params_list)]
        while self.engine.has_unfinished():
            self.engine.step()
        return [self._output(prompt, seq) for prompt, seq in zip(prompts, seqs)]

    def _output(self, prompt, seq) -> RequestOutput:
        return RequestOutput(
            prompt=prompt,
            text=self.tokenizer.decode(seq.output_ids),
            token_ids=list(seq.output_ids),
            finish_reason=seq.finish_reason,
            tokens=list(seq.outputs),
            stats=seq.stats,
        )


def _as_list(prompts) -> list:
    """A single prompt (text or ids) becomes a one-element list."""
    if isinstance(prompts, str):
        return [prompts]
    if prompts and isinstance(prompts[0], int):
        return [prompts]
    if not prompts:
        raise ValueError("prompts must not be empty")
    return list(prompts)
