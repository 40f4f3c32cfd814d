"""Text in, text out: a Hugging Face ``tokenizer.json`` read with the optional
`tokenizers` package (host-side; the engine itself works on token ids).

The end-of-sequence ids come from the checkpoint's generation_config.json, else its
config.json; an engine given a Tokenizer stops requests on them.
"""

from __future__ import annotations

import json
import os
import pathlib

TOKENIZER_FILE = "tokenizer.json"


def _eos_ids(path: pathlib.Path) -> tuple[int, ...]:
    for name in ("generation_config.json", "config.json"):
        file = path / name
        if file.is_file():
            eos = json.loads(file.read_text()).get("eos_token_id")
            if eos is not None:
                return tuple(eos) if isinstance(eos, list) else (int(eos),)
    return ()


class Tokenizer:
    """Encodes prompts (with the tokenizer's special tokens, e.g. BOS) and decodes
    outputs (without them)."""

    def __init__(self, tokenizer, eos_token_ids: tuple[int, ...] = ()):
        self._tokenizer = tokenizer
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer | None:
        """The checkpoint's tokenizer, or None when it ships no tokenizer.json."""
        path = pathlib.Path(path)
        if not (path / TOKENIZER_FILE).is_file():
            return None
        try:
            import tokenizers
        except ImportError as e:
            raise ImportError(
                f"{path} has a {TOKENIZER_FILE}; text prompts need the `tokenizers` package "
                "(pip install tokenizers, or the project's hf extra)"
            ) from e
        return cls(tokenizers.Tokenizer.from_file(str(path / TOKENIZER_FILE)), _eos_ids(path))

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def decode(self, token_ids) -> str:
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=True)
