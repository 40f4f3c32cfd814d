"""From a checkpoint directory to a ready engine: the model, its tokenizer, a KV pool
sized as a fraction of free memory (or in bytes), and a check that one request of
max_model_len tokens fits the pool before anything compiles."""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib

LOG = logging.getLogger("jenga_jax")


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """dtype: the weights' (None: as stored); max_model_len: longest request, prompt +
    output (None: the model's); kv_memory_fraction: of free memory for the KV pool,
    unless kv_budget_bytes gives it in bytes; the rest as in ``Engine`` and
    ``SchedulerConfig``."""

    dtype: str | None = None
    max_model_len: int | None = None
    kv_memory_fraction: float = 0.9
    kv_budget_bytes: int | None = None
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 256
    allocator: str = "jenga"
    enable_prefix_caching: bool = True
    seed: int = 0
    compilation_cache_dir: str | None = None

    def check(self) -> None:
        """Raise ValueError on a bad option (nothing loaded or compiled yet)."""
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if not 0 < self.kv_memory_fraction <= 1:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")
        if self.kv_budget_bytes is not None and self.kv_budget_bytes < 1:
            raise ValueError(f"kv_budget_bytes must be >= 1, got {self.kv_budget_bytes}")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.allocator not in ("jenga", "paged", "uniform"):
            raise ValueError(f"allocator must be jenga, paged or uniform, got {self.allocator!r}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")


def check_checkpoint_dir(path: str | os.PathLike) -> pathlib.Path:
    """Raise CheckpointError unless `path` is a directory with a config.json."""
    from models.hf import CheckpointError

    path = pathlib.Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint directory at {path}")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: not a checkpoint directory")
    return path


def load_engine(path: str | os.PathLike, options: EngineOptions = EngineOptions()):
    """(Engine, Tokenizer or None) for the checkpoint in `path`; the pool is checked to
    hold one request of max_model_len tokens (ValueError otherwise)."""
    from jenga_jax.engine.llm_engine import Engine
    from jenga_jax.engine.scheduler import SchedulerConfig
    from jenga_jax.engine.text import Tokenizer
    from jenga_jax.kv_budget import kv_budget_bytes
    from models.pretrained import load_pretrained

    options.check()
    path = check_checkpoint_dir(path)
    model = load_pretrained(path, dtype=options.dtype)
    cfg = model.cfg
    tokenizer = Tokenizer.from_dir(path)
    max_len = options.max_model_len or cfg.max_seq_len
    if max_len > cfg.max_seq_len:
        raise ValueError(f"max_model_len {max_len} exceeds the model's {cfg.max_seq_len}")
    budget = options.kv_budget_bytes
    if budget is None:
        budget = kv_budget_bytes(
            cfg,
            fraction=options.kv_memory_fraction,
            max_num_seqs=options.max_num_seqs,
            max_model_len=max_len,
            max_encoder_tokens=max_len if cfg.vision_dim is not None else 0,
            allocator=options.allocator,
        )
    LOG.info("KV pool: %.1f MiB (%s)", budget / 2**20, cfg.name)
    engine = Engine(
        model,
        kv_budget_bytes=budget,
        allocator=options.allocator,
        scheduler=SchedulerConfig(
            max_num_seqs=options.max_num_seqs,
            max_num_batched_tokens=options.max_num_batched_tokens,
        ),
        max_model_len=max_len,
        enable_prefix_caching=options.enable_prefix_caching,
        seed=options.seed,
        tokenizer=tokenizer,
        compilation_cache_dir=options.compilation_cache_dir,
    )
    check_pool_fits(engine)
    return engine, tokenizer


def check_pool_fits(engine) -> None:
    """Raise ValueError unless the pool holds a request of max_model_len tokens (host
    bookkeeping only: the probe is added and aborted before any step)."""
    from jenga_jax.core.errors import RequestError
    from jenga_jax.engine.llm_engine import EngineCounters
    from jenga_jax.engine.sampling import SamplingParams

    n = engine.max_model_len
    try:
        rid = engine.add_request([0] * (n - 1), SamplingParams(max_tokens=1), request_id="probe")
    except RequestError as e:
        pool = engine.manager.stats().pool_bytes
        raise ValueError(
            f"a KV pool of {pool / 2**20:.2f} MiB cannot hold one request of max_model_len "
            f"{n} tokens ({e}); give the pool more memory or lower max_model_len"
        ) from e
    engine.abort(rid)
    engine.counters = EngineCounters()
