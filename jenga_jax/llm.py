"""``LLM``: one line from a checkpoint directory to generated text.

    from jenga_jax import LLM, SamplingParams
    llm = LLM("/path/to/checkpoint", max_model_len=512)
    outputs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    reply = llm.chat([{"role": "user", "content": "Hi!"}])[0].text

The KV pool takes a fraction of free memory by default (``kv_memory_fraction``;
``kv_budget_bytes`` still sizes it in bytes); see ``jenga_jax.loading``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from jenga_jax.engine.engine_request import RequestOutput
from jenga_jax.engine.sampling import SamplingParams
from jenga_jax.loading import EngineOptions, load_engine


class LLM:
    """The model in `path` (Hugging Face or converted) behind an ``Engine``.

    Keyword options are ``EngineOptions``' (dtype, max_model_len, kv_memory_fraction,
    kv_budget_bytes, max_num_seqs, max_num_batched_tokens, allocator, seed, ...);
    warmup=True compiles every step shape now instead of on first use;
    chat_template: a jinja2 template to use instead of the checkpoint's."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        warmup: bool = False,
        chat_template: str | None = None,
        **options,
    ):
        self.engine, self.tokenizer = load_engine(path, EngineOptions(**options))
        self._template_source = chat_template
        self._template = None
        self.path = path
        if warmup:
            self.engine.warmup()

    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Outputs (with ``text`` when the checkpoint has a tokenizer), in prompt order.
        A prompt is text or token ids; one prompt may be given alone."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self.engine.generate(list(prompts), sampling_params)

    def chat(
        self,
        messages: Sequence[dict] | Sequence[Sequence[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Replies to one conversation (a list of {"role", "content"} messages) or to
        several, rendered with the chat template (needs jinja2)."""
        if messages and isinstance(messages[0], dict):
            messages = [messages]
        template = self._chat_template()
        prompts = [
            self.tokenizer.encode(
                template.render(list(conv), add_generation_prompt), add_special_tokens=False
            )
            for conv in messages
        ]
        return self.engine.generate(prompts, sampling_params)

    def _chat_template(self):
        from jenga_jax.server.chat_template import ChatTemplate

        if self._template is None:
            if self.tokenizer is None:
                raise ValueError(f"{self.path} has no tokenizer.json: chat needs one")
            if self._template_source is not None:
                base = ChatTemplate.from_dir(self.path)
                special = base.special_tokens if base else {}
                self._template = ChatTemplate(self._template_source, special)
            else:
                self._template = ChatTemplate.from_dir(self.path)
            if self._template is None:
                raise ValueError(
                    f"{self.path} has no chat template (tokenizer_config.json or "
                    "chat_template.jinja): pass LLM(..., chat_template=...)"
                )
        return self._template
