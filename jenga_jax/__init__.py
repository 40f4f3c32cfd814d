"""jenga-jax: Jenga's memory management for heterogeneous LLMs, in JAX."""

__version__ = "0.1.0"
