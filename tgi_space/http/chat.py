"""The chat template of `tokenizer_config.json`, rendered with jinja2 as TGI renders it with minijinja."""

from __future__ import annotations

from datetime import datetime

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tgi_space.http.errors import ApiError
from tgi_space.http.schemas import Message
from tgi_space.tokenizer import Tokenizer


def _raise_exception(message: str):
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """Renders messages (text content only; image chunks as `![](url)`) with the generation prompt."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        source = tokenizer.chat_template
        if isinstance(source, list):  # named templates: take "default", as TGI
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        self.template = None
        if source:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
            self.template = env.from_string(source)

    def render(self, messages: list[Message]) -> str:
        """The prompt text; 422 `template_error` when there is no template or it raises."""
        if self.template is None:
            raise ApiError(422, "Template error: template not found", "template_error")
        try:
            return self.template.render(
                messages=[{"role": m.role, "content": m.text()} for m in messages],
                bos_token=self.tokenizer.bos_token,
                eos_token=self.tokenizer.eos_token,
                add_generation_prompt=True,
                tools=None,
            )
        except TemplateError as err:
            raise ApiError(422, f"Template error: {err}", "template_error") from None
