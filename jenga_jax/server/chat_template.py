"""Chat templates: the checkpoint's jinja2 template, rendered as transformers does.

The template comes from ``chat_template.jinja`` or tokenizer_config.json's
``chat_template`` (a string, or a list of named templates: "default" is used), or from a
file given to the server. It is rendered in jinja2's immutable sandbox with
trim_blocks and lstrip_blocks, ``raise_exception``, ``strftime_now`` and the ``tojson``
filter, with the messages, ``add_generation_prompt`` and the tokenizer's special tokens
(``bos_token``, ``eos_token``, ...) as variables.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

TOKENIZER_CONFIG = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token")


class ChatTemplateError(ValueError):
    """A template that cannot be read or rendered (says why)."""


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # an AddedToken as saved by transformers
        return value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    """A compiled template and the special tokens it may use."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )

        def raise_exception(message):
            raise ChatTemplateError(f"the chat template refused the messages: {message}")

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(
                x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                sort_keys=sort_keys,
            )  # fmt: skip

        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template does not compile: {e}") from e
        self.source = source
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> ChatTemplate | None:
        """The checkpoint's template, or None when it has none."""
        path = pathlib.Path(path)
        config = {}
        if (path / TOKENIZER_CONFIG).is_file():
            try:
                config = json.loads((path / TOKENIZER_CONFIG).read_text())
            except json.JSONDecodeError as e:
                raise ChatTemplateError(f"{path / TOKENIZER_CONFIG} is not valid JSON: {e}") from e
        special = {k: t for k in _SPECIAL if (t := _token_text(config.get(k))) is not None}
        if (path / TEMPLATE_FILE).is_file():
            return cls((path / TEMPLATE_FILE).read_text(), special)
        source = config.get("chat_template")
        if isinstance(source, list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if not source:
            return None
        return cls(source, special)

    @classmethod
    def from_file(cls, file: str | os.PathLike, special_tokens=None) -> ChatTemplate:
        try:
            return cls(pathlib.Path(file).read_text(), special_tokens)
        except OSError as e:
            raise ChatTemplateError(f"cannot read the chat template {file}: {e}") from e

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template failed on these messages: {e}") from e
