"""Count XLA compilations of the jitted steps (from JAX's compile log)."""

from __future__ import annotations

import collections
import logging
import re

import jax

_LOGGER = "jax._src.interpreters.pxla"  # logs "Compiling jit(name) ..."
_MUTED = ("jax._src.dispatch", _LOGGER)  # jax.log_compiles also logs timings there
_PATTERN = re.compile(r"Compiling jit\((\w+)\)")


class CompileCounter(logging.Handler):
    """Context manager: ``counts[name]`` = compilations of ``jit(name)`` inside it."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.counts: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        match = _PATTERN.match(record.getMessage())
        if match:
            self.counts[match.group(1)] += 1

    def __enter__(self) -> CompileCounter:
        self._log_compiles = jax.log_compiles(True)
        self._log_compiles.__enter__()
        self._saved = []
        for name in _MUTED:
            logger = logging.getLogger(name)
            self._saved.append((logger, logger.level, logger.propagate))
            logger.setLevel(logging.DEBUG)
            logger.propagate = False  # count, do not print
        self._null = logging.NullHandler()
        logging.getLogger("jax._src.dispatch").addHandler(self._null)
        logging.getLogger(_LOGGER).addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger(_LOGGER).removeHandler(self)
        logging.getLogger("jax._src.dispatch").removeHandler(self._null)
        for logger, level, propagate in self._saved:
            logger.setLevel(level)
            logger.propagate = propagate
        self._log_compiles.__exit__(*exc)
