"""serving_peers.py's driver for jenga-jax (the project's venv, the repo on PYTHONPATH).

The Hugging Face checkpoint is read by models.pretrained.load_pretrained; the Engine gets
the trace's scheduler settings, a KV budget that holds max_num_seqs full-length requests
twice over (memory not binding), and compiles every step shape in Engine.warmup().
XLA:CPU uses every core of the machine (its default thread pool)."""

from __future__ import annotations

import os

import jax
from protocol import serve

from jenga_jax.engine.compile_counter import CompileCounter
from jenga_jax.engine.llm_engine import Engine
from jenga_jax.engine.sampling import SamplingParams
from jenga_jax.engine.scheduler import SchedulerConfig
from models.pretrained import load_pretrained

_compiles = CompileCounter()


def load(checkpoint: str, settings: dict) -> Engine:
    model = load_pretrained(checkpoint, dtype="float32")
    cfg = model.cfg
    kv_bytes_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    tokens = settings["max_num_seqs"] * settings["max_model_len"]
    engine = Engine(
        model,
        kv_budget_bytes=2 * tokens * kv_bytes_per_token,
        scheduler=SchedulerConfig(
            max_num_seqs=settings["max_num_seqs"],
            max_num_batched_tokens=settings["max_num_batched_tokens"],
        ),
        max_model_len=settings["max_model_len"],
        seed=0,
    )
    engine.warmup()
    _compiles.__enter__()  # counts compilations from here on
    return engine


def generate(engine: Engine, prompts, max_tokens) -> list[list[int]]:
    ids = [
        engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=m))
        for p, m in zip(prompts, max_tokens)
    ]
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = list(o.output_token_ids)
    return [outs[i] for i in ids]


def describe(engine: Engine) -> dict:
    import jenga_jax

    return dict(
        version=f"jenga-jax (jax {jax.__version__})",
        threads=f"XLA:CPU default thread pool, {os.cpu_count()} cores",
        compilation_cache=str(engine.compilation_cache_dir),
        source=os.path.dirname(jenga_jax.__file__),
    )


_seen = 0


def run_stats(engine: Engine) -> dict:
    """XLA compilations since the previous run (0 expected once warmed up)."""
    global _seen
    total = sum(_compiles.counts.values())
    new, _seen = total - _seen, total
    return dict(compilations=new)


if __name__ == "__main__":
    serve(load, generate, describe, run_stats)
