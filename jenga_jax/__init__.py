"""jenga-jax: Jenga's memory management for heterogeneous LLMs, in JAX.

The serving API is importable from here (``from jenga_jax import Engine``); it loads
JAX on first use, so ``jenga_jax.core`` stays usable without it.
"""

import importlib

_LAZY = {
    "Engine": "jenga_jax.engine.llm_engine",
    "Image": "jenga_jax.engine.model_runner",
    "LLM": "jenga_jax.llm",
    "RequestOutput": "jenga_jax.engine.engine_request",
    "SamplingParams": "jenga_jax.engine.sampling",
    "SchedulerConfig": "jenga_jax.engine.scheduler",
    "Tokenizer": "jenga_jax.engine.text",
}
__all__ = ["__version__", *_LAZY]


def _version() -> str:
    import importlib.metadata  # on demand: it costs 0.1 s (``jenga-jax --help`` stays fast)

    try:
        return importlib.metadata.version("jenga-jax")
    except importlib.metadata.PackageNotFoundError:  # a clone that was never installed
        return "0.0.0+unknown"


def __getattr__(name: str):
    if name == "__version__":
        return _version()
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jenga_jax' has no attribute {name!r}")
