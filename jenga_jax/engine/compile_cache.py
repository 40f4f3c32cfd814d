"""JAX's persistent compilation cache, on by default for engines.

An engine compiles every step shape before serving (``engine.warmup``); with the cache,
a later start of the same model and shapes loads the compiled steps from disk instead.
The directory: the ``cache_dir`` argument, else ``$JENGA_JAX_CACHE_DIR``, else
``~/.cache/jenga-jax/xla``; ``"off"`` (argument or variable) turns it off. A directory
the user already gave JAX (``jax_compilation_cache_dir``) is kept as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV = "JENGA_JAX_CACHE_DIR"
OFF = "off"


def default_dir() -> str:
    return str(Path.home() / ".cache" / "jenga-jax" / "xla")


def enable_compilation_cache(cache_dir: str | os.PathLike | None = None) -> str | None:
    """Turn JAX's persistent compilation cache on; returns the directory in use (None:
    off). Every compiled step is cached, however fast it compiled."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    choice = str(cache_dir) if cache_dir is not None else os.environ.get(ENV, default_dir())
    if choice in (OFF, ""):
        return None
    Path(choice).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", choice)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return choice
