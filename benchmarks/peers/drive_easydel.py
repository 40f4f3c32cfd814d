"""serving_peers.py's driver for EasyDeL's eSurge engine (runs in the easydel venv of
setup.sh, JAX on its CPU backend).

eSurge loads the Hugging Face checkpoint itself (float32), with the trace's scheduler
settings and no context reserve (every request fits max_model_len). Its public
generate() takes text: each prompt is written as the "<id> <id> ..." words of the
checkpoint's word-level tokenizer, which map back to exactly those ids (checked at load).
Greedy, EOS ignored. Prefix caching is off (eSurge has no reset between runs, and the
trace's random prompts share no prefixes within a run). XLA:CPU uses every core."""

from __future__ import annotations

import itertools
import os

import easydel
import easydel.caching.ragged_page.cache as _ragged_page_cache
import jax
import jax.numpy as jnp
from easydel.inference.esurge import eSurge
from easydel.inference.sampling_params import SamplingParams
from protocol import serve

_request_ids = itertools.count()
# On CPU eSurge sizes its KV pool at a fixed 4 GiB (JAX reports no memory stats there, and
# hbm_utilization only scales stats), 5.7 GB resident in all. Its budget function is
# replaced by this size: 512 MiB holds the trace's 64 sequences of 512 tokens 4 times.
KV_POOL_BYTES = int(os.environ.get("JENGA_PEERS_EASYDEL_KV_MIB", "512")) * 2**20
_ragged_page_cache.per_device_hbm_budget_bytes = lambda *args, **kwargs: KV_POOL_BYTES


def _text(ids) -> str:
    return " ".join(f"<{i}>" for i in ids)


def load(checkpoint: str, settings: dict) -> eSurge:
    engine = eSurge(
        model=checkpoint,
        dtype=jnp.float32,
        max_model_len=settings["max_model_len"],
        max_num_seqs=settings["max_num_seqs"],
        max_num_batched_tokens=settings["max_num_batched_tokens"],
        reserve_tokens=0,
        enable_prefix_caching=False,
        silent_mode=True,
    )
    engine.initiate()  # the background scheduler thread
    probe = [5, 17, 4095, 3000]
    got = engine.tokenizer(_text(probe), add_special_tokens=False)["input_ids"]
    if list(got) != probe:
        raise RuntimeError(f"the tokenizer maps {probe} to {got}: prompts would differ")
    return engine


def generate(engine: eSurge, prompts, max_tokens) -> list[list[int]]:
    if len(set(max_tokens)) != 1:
        raise ValueError("this driver sends one SamplingParams per call")
    params = SamplingParams(max_tokens=max_tokens[0], temperature=0.0, ignore_eos=True)
    ids = [f"r{next(_request_ids)}" for _ in prompts]
    outs = engine.generate([_text(p) for p in prompts], params, request_id=ids, use_tqdm=False)
    by_id = {o.request_id: list(o.outputs[0].token_ids) for o in outs}  # in finish order
    return [by_id[i] for i in ids]


def describe(engine: eSurge) -> dict:
    return dict(
        version=f"easydel {easydel.__version__} (jax {jax.__version__})",
        threads=f"XLA:CPU default thread pool ({os.cpu_count()} cores)",
        kv_pool_bytes=KV_POOL_BYTES,
    )


if __name__ == "__main__":
    serve(load, generate, describe)
