"""One choice's text as its tokens come: incremental detokenization and stop strings.

Text that could still turn into a stop string is held back while streaming; when a stop
string appears, the text ends before it and the request is finished ("stop").
"""

from __future__ import annotations

from jenga_jax.engine.text import TextStream, Tokenizer


class ChoiceText:
    def __init__(self, tokenizer: Tokenizer | None, stop: tuple[str, ...] = ()):
        self._stream = TextStream(tokenizer) if tokenizer is not None else None
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # text so far (cut before a stop string once one appears)
        self.sent = 0  # characters handed out
        self.stopped = False  # a stop string appeared

    def push(self, token_ids) -> None:
        if self._stream is None or self.stopped:
            return
        for t in token_ids:
            self._add(self._stream.push(t))
            if self.stopped:
                return

    def finish(self) -> None:
        if self._stream is not None and not self.stopped:
            self._add(self._stream.flush())

    def _add(self, piece: str) -> None:
        if not piece:
            return
        start = max(0, len(self.text) - self._hold)
        self.text += piece
        found = [i for s in self._stop if (i := self.text.find(s, start)) >= 0]
        if found:  # the earliest stop string wins
            self.text = self.text[: min(found)]
            self.stopped = True

    def take(self, final: bool) -> str:
        """New text to send; while not `final`, what may still become a stop string
        stays held back."""
        end = len(self.text)
        if not (final or self.stopped):
            end -= self._hold
        if end <= self.sent:
            return ""
        piece = self.text[self.sent : end]
        self.sent = end
        return piece
