"""Shared steps of the transformers parity tests (tests/test_hf_*.py).

Each test builds a tiny random model with transformers, perturbs every parameter (a
fresh model has unit norms, zero biases, gates and sinks, which would hide a wrong
mapping), saves it with `save_pretrained`, loads it with `models.hf`, and compares.
"""

from __future__ import annotations

import numpy as np

RELATIVE_TOLERANCE = 1e-4  # float32 logits, as the issue asks


def perturb(torch, model, *, seed: int = 0, scale: float = 0.1):
    """Add N(0, scale^2) noise to every parameter of a torch model, in place; returns it."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def save(model, path, *, max_shard_size: str | None = None):
    """save_pretrained into `path` (several shards and an index with max_shard_size)."""
    if max_shard_size is None:
        model.save_pretrained(path)
    else:
        model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


def relative_error(got, ref) -> float:
    """max |got - ref| / max |ref| (printed: `pytest -rP tests/test_hf_*.py` shows it)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    error = float(np.abs(got - ref).max() / np.abs(ref).max())
    print(f"relative error {error:.2e}")
    return error


def hf_greedy(torch, model, prompts: np.ndarray, new_tokens: int, **inputs) -> list[list[int]]:
    """transformers' greedy `generate` of exactly `new_tokens` tokens per prompt [B, T].

    No end-of-sequence id: the engine runs without stop ids, so neither side may stop
    early or ban a token (`min_new_tokens` would forbid EOS in transformers)."""
    configs = [model.generation_config, model.config, model.config.get_text_config()]
    holders = [c for c in configs if hasattr(c, "eos_token_id")]
    saved = [h.eos_token_id for h in holders]
    try:  # a copied generation config with eos None falls back to the model's own ids
        for h in holders:
            h.eos_token_id = None
        with torch.no_grad():
            out = model.generate(
                torch.tensor(prompts),
                attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
                **inputs,
            )
    finally:
        for h, eos in zip(holders, saved):
            h.eos_token_id = eos
    assert out.shape[1] == prompts.shape[1] + new_tokens
    return out[:, prompts.shape[1] :].numpy().tolist()


def engine_greedy(model, prompts: np.ndarray, new_tokens: int, images=None, **engine_kw):
    """The paged engine's greedy tokens for prompts [B, T] (images: per prompt, or None)."""
    from jenga_jax import Engine, SamplingParams

    engine_kw = {"num_large_pages": 64, "max_model_len": 128, **engine_kw}
    engine = Engine(model, **engine_kw)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens)
    outs = engine.generate([p.tolist() for p in prompts], params, images=images)
    return [list(o.output_token_ids) for o in outs]
