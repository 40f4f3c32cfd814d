"""Errors of the host core. Each says what was wrong and what was expected."""


class JengaError(Exception):
    """Base class of every error this package raises on bad input."""


class LayoutError(JengaError, ValueError):
    """A layer kind or model layout is malformed."""


class UnknownModelError(JengaError, KeyError):
    """A model name is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class RequestError(JengaError, ValueError):
    """A request is malformed, unknown, or in the wrong state for the call."""


class RequestTooLargeError(RequestError):
    """A request could never fit in the whole pool, even with nothing else running."""
