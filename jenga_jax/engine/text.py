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
            try:
                eos = json.loads(file.read_text()).get("eos_token_id")
            except json.JSONDecodeError as e:
                raise ValueError(f"{file} is not valid JSON: {e}") from e
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

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; add_special_tokens=False leaves out what the tokenizer's
        template adds (e.g. BOS: a chat template writes its own)."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def decode(self, token_ids) -> str:
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=True)


class TextStream:
    """A growing token list's text, piece by piece. Each token decodes only the tokens
    since the last piece, with the ones before that piece as context (so merges and
    leading spaces come out as in a full decode), never the whole output again. A piece
    is held back while it ends in an incomplete character."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._tokens: list[int] = []
        self._prefix = 0  # context starts here
        self._read = 0  # text up to here has been given out

    def _new_text(self) -> str:
        seen = self._tokenizer.decode(self._tokens[self._prefix : self._read])
        text = self._tokenizer.decode(self._tokens[self._prefix :])
        return text[len(seen) :] if len(text) > len(seen) else ""

    def push(self, token: int) -> str:
        """The text this token completes ("" while a character is incomplete)."""
        self._tokens.append(token)
        piece = self._new_text()
        if not piece or piece.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._tokens)
        return piece

    def flush(self) -> str:
        """What is still held back (at the end of the output)."""
        piece = self._new_text()
        self._prefix = self._read = len(self._tokens)
        return piece
