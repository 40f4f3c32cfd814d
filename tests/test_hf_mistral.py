"""Mistral and Ministral checkpoints saved by transformers load with the same logits, and
the paged engine generates what transformers generates (greedy), with sliding windows
shorter than prompt + generation; the layouts of real configs match the registry."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need the hf extra (torch)")
transformers = pytest.importorskip("transformers", reason="parity tests need transformers")
pytest.importorskip("safetensors", reason="parity tests need safetensors")

from flax import nnx  # noqa: E402

from hf_parity import engine_greedy, hf_greedy, perturb, relative_error, save  # noqa: E402
from jenga_jax.core.registry import get_layout  # noqa: E402
from models.config import FULL, SLIDING  # noqa: E402
from models.hf import CheckpointError, decoder_config, load_hf_checkpoint  # noqa: E402

VOCAB = 128
# the dense forward, compiled whole (faster here than op by op)
forward_dense = nnx.jit(lambda model, ids: model.forward_dense(ids))
# no EOS id: the engine runs without stop ids, transformers' generate would stop at EOS
# (token 2 for Mistral, at times a tiny model's argmax)
_TINY = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
    eos_token_id=None,
)  # fmt: skip


def _mistral():
    # every layer sliding (window 8), 4 query heads share 1 kv head, untied head
    return transformers.MistralForCausalLM(
        transformers.MistralConfig(
            **_TINY, num_hidden_layers=2, num_key_value_heads=1, sliding_window=8,
            rope_theta=1000.0, tie_word_embeddings=False,
        )
    )  # fmt: skip


def _ministral():
    # full / sliding (16) pattern, 2 kv heads, head_dim 32 (q width 128 != hidden 64), tied
    return transformers.MinistralForCausalLM(
        transformers.MinistralConfig(
            **_TINY, num_hidden_layers=2, num_key_value_heads=2, head_dim=32, sliding_window=16,
            layer_types=["full_attention", "sliding_attention"],
            rope_theta=10_000.0, tie_word_embeddings=True,
        )
    )  # fmt: skip


BUILDERS = {"mistral": _mistral, "ministral": _ministral}
WANT_TYPES = {"mistral": (SLIDING,) * 2, "ministral": (FULL, SLIDING)}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def saved(request, tmp_path_factory):
    """(name, perturbed transformers model, checkpoint dir)."""
    torch.manual_seed(0)
    model = perturb(torch, BUILDERS[request.param]())
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "mistral":
        save(model, path, max_shard_size="100KB")  # several shards + index
        assert (path / "model.safetensors.index.json").is_file()
    else:
        save(model, path)
    return request.param, model, path


def test_logits_match_transformers(saved):
    name, hf_model, path = saved
    ours = load_hf_checkpoint(path)
    assert ours.cfg.layer_types == WANT_TYPES[name]
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 48))  # longer than the windows
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids)).logits.float().numpy()
    assert relative_error(forward_dense(ours, ids), ref) <= 1e-4


def test_paged_engine_generates_what_transformers_generates(saved):
    _, hf_model, path = saved
    prompts = np.random.default_rng(1).integers(0, VOCAB, (3, 20))  # 20 + 32 > window
    got = engine_greedy(load_hf_checkpoint(path), prompts, 32)
    assert got == hf_greedy(torch, hf_model, prompts, 32)


def _hf_dict(cfg, arch: str) -> dict:
    return {**cfg.to_dict(), "architectures": [arch]}


def test_ministral_8b_layout_matches_registry():
    """Ministral-8B-Instruct-2410's sizes. Its original config.json (MistralForCausalLM)
    has one sliding_window for every layer; the registry's pattern (1 full layer, then
    3 sliding, window 32k) is the model card's, written here as transformers'
    MinistralConfig writes it: `layer_types`."""
    sizes = dict(
        vocab_size=131_072, hidden_size=4096, intermediate_size=12_288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, sliding_window=32_768,
        max_position_embeddings=32_768, rope_theta=100_000_000.0,
    )  # fmt: skip
    types = ["full_attention" if i % 4 == 0 else "sliding_attention" for i in range(36)]
    hf = _hf_dict(transformers.MinistralConfig(**sizes, layer_types=types), "MinistralForCausalLM")
    ours = decoder_config(hf).layout(kv_dtype="bfloat16")
    assert ours.layers == get_layout("ministral-8b").layers
    # the original config.json, read as transformers' Mistral reads it: all sliding
    original = _hf_dict(transformers.MistralConfig(**sizes), "MistralForCausalLM")
    assert decoder_config(original).layer_types == (SLIDING,) * 36


def test_llama_3_1_8b_layout_matches_registry():
    cfg = transformers.LlamaConfig(
        vocab_size=128_256, hidden_size=4096, intermediate_size=14_336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131_072,
        rope_theta=500_000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192),
    )  # fmt: skip
    ours = decoder_config(_hf_dict(cfg, "LlamaForCausalLM")).layout(kv_dtype="bfloat16")
    assert ours.layers == get_layout("llama-3.1-8b").layers


def test_mistral_sliding_window_rules():
    hf = _hf_dict(
        transformers.MistralConfig(**_TINY, num_key_value_heads=2, sliding_window=None),
        "MistralForCausalLM",
    )
    assert set(decoder_config(hf).layer_types) == {FULL}
    del hf["sliding_window"]  # absent: transformers' default 4096
    assert decoder_config(hf).window == 4096
    # Mistral ignores layer_types (as transformers does); Ministral reads it
    hf = {**hf, "sliding_window": 8, "layer_types": ["full_attention"] * hf["num_hidden_layers"]}
    assert set(decoder_config(hf).layer_types) == {SLIDING}
    assert set(decoder_config({**hf, "architectures": ["MinistralForCausalLM"]}).layer_types) == {
        FULL
    }


def _copy_with(checkpoint, tmp_path, **changes):
    bad = tmp_path / "bad"
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(checkpoint, bad)
    config = json.loads((checkpoint / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, **changes}))
    return bad


def test_bad_checkpoints_are_named(saved, tmp_path):
    name, _, path = saved
    with pytest.raises(CheckpointError, match="hidden_act='gelu' is not implemented"):
        load_hf_checkpoint(_copy_with(path, tmp_path, hidden_act="gelu"))
    # a head_dim the tensors do not have: the first projection is named with both shapes
    with pytest.raises(CheckpointError, match=r"self_attn\.[qkv]_proj\.weight: expected shape"):
        load_hf_checkpoint(_copy_with(path, tmp_path, head_dim=8))
    if name == "ministral":
        bad_types = ["full_attention", "chunked_attention"]
        with pytest.raises(CheckpointError, match="chunked_attention.*not implemented"):
            load_hf_checkpoint(_copy_with(path, tmp_path, layer_types=bad_types))
        with pytest.raises(CheckpointError, match="sliding_window is null"):
            load_hf_checkpoint(_copy_with(path, tmp_path, sliding_window=None))
