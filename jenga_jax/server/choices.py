"""What one choice of a completion has produced so far, and its OpenAI fields."""

from __future__ import annotations

import dataclasses

from jenga_jax.engine.engine_request import RequestOutput
from jenga_jax.engine.text import Tokenizer
from jenga_jax.server.text_output import ChoiceText


@dataclasses.dataclass
class Choice:
    index: int
    request_id: str
    prompt_len: int
    text: ChoiceText
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    cached_tokens: int = 0  # prompt tokens the prefix cache held
    role_sent: bool = False  # chat streams: the first delta carries the role

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def update(self, out: RequestOutput) -> tuple[list[int], list[float]]:
        """Take an engine output; returns the new (token ids, logprobs)."""
        new = list(out.output_token_ids[len(self.token_ids) :])
        self.token_ids += new
        self.cached_tokens = out.num_cached_tokens
        lps = []
        if out.output_logprobs is not None:
            lps = list(out.output_logprobs[len(self.logprobs) :])
            self.logprobs += lps
        self.text.push(new)
        if out.finished:
            self.text.finish()
            self.finish_reason = out.finish_reason
        if self.text.stopped and not self.done:
            self.finish_reason = "stop"
        return new, lps


def completion_logprobs(tokenizer: Tokenizer | None, ids, lps, offset: int) -> dict:
    """The completions API's logprobs object for tokens `ids` (text offsets from `offset`)."""
    tokens = [_token_text(tokenizer, t) for t in ids]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": None, "text_offset": offsets}


def chat_logprobs(tokenizer: Tokenizer | None, ids, lps) -> dict:
    content = []
    for t, lp in zip(ids, lps):
        text = _token_text(tokenizer, t)
        content.append(
            {"token": text, "logprob": lp, "bytes": list(text.encode()), "top_logprobs": []}
        )
    return {"content": content}


def _token_text(tokenizer: Tokenizer | None, token_id: int) -> str:
    if tokenizer is None:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id])
