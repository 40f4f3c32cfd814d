"""Request bodies of the OpenAI API (the fields this server reads), as pydantic models.

Unknown fields are ignored, as OpenAI's own server does; fields this server cannot
honour (penalties, logit_bias, echo, tools, ...) are refused with a 400 naming them
rather than silently ignored. Extensions, as vLLM spells them: ``top_k``,
``stop_token_ids``, ``cache_salt`` (prefix-cache isolation per tenant) and
``return_token_ids`` (each choice carries its ``token_ids``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from jenga_jax.server.errors import not_supported


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)  # 0 or -1: off
    seed: int | None = Field(default=None, ge=0, lt=2**32)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    cache_salt: str | None = Field(default=None, min_length=1)
    return_token_ids: bool = False
    # Refused unless neutral (the engine has no such processors):
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None

    def check_supported(self) -> None:
        if self.presence_penalty != 0 or self.frequency_penalty != 0:
            which = "presence_penalty" if self.presence_penalty != 0 else "frequency_penalty"
            raise not_supported(which, "a non-zero penalty")
        if self.logit_bias:
            raise not_supported("logit_bias", "a logit bias")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise not_supported("echo", "echoing the prompt")
        if self.suffix:
            raise not_supported("suffix", "a suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise not_supported("best_of", "best_of other than n")
        if self.logprobs:
            raise not_supported(
                "logprobs", "top alternatives (logprobs > 0; 0 gives each sampled token's)"
            )


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    add_generation_prompt: bool = True
    tools: list | None = None
    response_format: dict | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise not_supported("tools", "tool calling")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise not_supported("response_format", "a structured response format")
        if self.top_logprobs:
            raise not_supported("top_logprobs", "top alternatives (top_logprobs > 0)")

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def template_messages(self) -> list[dict]:
        return [
            {**(m.model_extra or {}), "role": m.role, "content": m.text()} for m in self.messages
        ]
