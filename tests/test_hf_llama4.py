"""A Llama-4 checkpoint saved by transformers loads into the flax model with the same
logits, and the paged engine generates what transformers generates (greedy).

The tiny model keeps what breaks naive ports: chunked RoPE layers (chunk 16, shorter
than prompt + generation) and a global NoPE layer with temperature tuning (floor_scale
4, so it changes every few tokens), interleaved (complex) RoPE, the weightless qk norm,
GQA 2:1, dense MLPs of `intermediate_size_mlp` next to MoE layers (top 2 of 4, sigmoid
scores on the expert inputs, a shared expert)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need the hf extra (torch)")
transformers = pytest.importorskip("transformers", reason="parity tests need transformers")
pytest.importorskip("safetensors", reason="parity tests need safetensors")
from safetensors.numpy import load_file, save_file  # noqa: E402

from hf_parity import engine_greedy, hf_greedy, perturb, relative_error, save  # noqa: E402
from jenga_jax.core.registry import get_config, get_layout  # noqa: E402
from models.config import CHUNKED, FULL  # noqa: E402
from models.hf import CheckpointError, load_hf_checkpoint  # noqa: E402 (after the skips)
from models.hf.registry import decoder_config  # noqa: E402

VOCAB = 128
LLAMA3_ROPE = dict(
    rope_type="llama3", rope_theta=500_000.0, factor=8.0, low_freq_factor=1.0,
    high_freq_factor=4.0, original_max_position_embeddings=64,
)  # fmt: skip


def text_config(**overrides):
    sizes = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=32, intermediate_size_mlp=96,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_local_experts=4, num_experts_per_tok=2, interleave_moe_layer_step=2,
        attention_chunk_size=16, floor_scale=4, attn_scale=0.5, max_position_embeddings=256,
        rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False, eos_token_id=None,
    )  # fmt: skip
    return transformers.Llama4TextConfig(**{**sizes, **overrides})


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    cfg = text_config()
    assert cfg.layer_types[3] == "full_attention" and cfg.no_rope_layers == [1, 1, 1, 0]
    assert cfg.moe_layers == [1, 3]
    return perturb(torch, transformers.Llama4ForCausalLM(cfg))


@pytest.fixture(scope="module")
def checkpoint(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("llama4")
    save(hf_model, path, max_shard_size="100KB")  # several shards + index
    assert (path / "model.safetensors.index.json").is_file()
    return path


def test_config_has_every_llama4_feature(checkpoint):
    cfg = decoder_config(json.loads((checkpoint / "config.json").read_text()))
    assert cfg.layer_types == (CHUNKED, CHUNKED, CHUNKED, FULL) and cfg.chunk == 16
    assert cfg.rope is None and cfg.local_rope.interleaved and cfg.local_rope.scaling == "llama3"
    assert cfg.rope_qk_l2_norm and cfg.nope_temperature == (4.0, 0.5)
    assert cfg.moe_layers == (1, 3) and cfg.moe.top_k == 2 and cfg.moe.shared_dim == 32
    assert cfg.mlp_dim == 96 and cfg.num_heads == 2 * cfg.num_kv_heads


def test_logits_match_transformers(hf_model, checkpoint):
    ours = load_hf_checkpoint(checkpoint)
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 52))
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids)).logits.float().numpy()
    assert relative_error(ours.forward_dense(ids), ref) <= 1e-4


def test_paged_engine_generates_what_transformers_generates(hf_model, checkpoint):
    prompts = np.random.default_rng(1).integers(0, VOCAB, (3, 20))
    got = engine_greedy(load_hf_checkpoint(checkpoint), prompts, 32)
    assert got == hf_greedy(torch, hf_model, prompts, 32)


def test_multimodal_checkpoint_loads_its_language_model(tmp_path):
    """Llama4ForConditionalGeneration: the text part (top 1 of 4 experts in every
    layer, NoPE every 2nd layer, attention biases, no qk norm, no temperature)."""
    torch.manual_seed(1)
    vision = transformers.Llama4VisionConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        vision_output_dim=32, image_size=28, patch_size=14, projector_input_dim=32,
        projector_output_dim=32,
    )  # fmt: skip
    text = text_config(
        num_hidden_layers=3, no_rope_layer_interval=2, num_experts_per_tok=1,
        interleave_moe_layer_step=1, attention_bias=True, use_qk_norm=False,
        attn_temperature_tuning=False,
    )  # fmt: skip
    cfg = transformers.Llama4Config(vision_config=vision, text_config=text)
    hf_model = perturb(torch, transformers.Llama4ForConditionalGeneration(cfg), seed=1)
    save(hf_model, tmp_path)
    ours = load_hf_checkpoint(tmp_path)
    assert ours.cfg.layer_types == (CHUNKED, FULL, CHUNKED) and ours.cfg.moe_layers == (0, 1, 2)
    assert ours.cfg.attn_bias and not ours.cfg.rope_qk_l2_norm and ours.cfg.nope_temperature is None
    ids = np.random.default_rng(2).integers(0, VOCAB, (2, 52))
    # The reference is the wrapper's own language model: on a text-only prompt the
    # wrapper's forward is exactly that call (no image features are merged), and
    # transformers 5.24's wrapper breaks after it (it reads `image_outputs` from a
    # CausalLM output). The checkpoint we load is still the wrapper's, with its
    # `language_model.` prefixes, so a wrongly mapped tensor still fails here.
    with torch.no_grad():
        ref = hf_model.language_model(input_ids=torch.tensor(ids)).logits.float().numpy()
    assert relative_error(ours.forward_dense(ids), ref) <= 1e-4


def scout_config() -> dict:
    """config.json of Llama-4-Scout's text model, from the registry's published sizes."""
    raw = get_config("llama-4-scout").raw
    keys = (
        "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
        "head_dim", "no_rope_layers", "no_rope_layer_interval", "attention_chunk_size",
        "use_qk_norm", "floor_scale", "attn_scale", "num_local_experts",
        "num_experts_per_tok", "interleave_moe_layer_step", "vocab_size",
        "max_position_embeddings",
    )  # fmt: skip
    rope = dict(
        rope_type=raw["rope_scaling_type"], rope_theta=raw["rope_theta"],
        factor=raw["rope_scaling_factor"], low_freq_factor=raw["rope_scaling_low_freq_factor"],
        high_freq_factor=raw["rope_scaling_high_freq_factor"],
        original_max_position_embeddings=raw["rope_scaling_original_max_position_embeddings"],
    )  # fmt: skip
    cfg = transformers.Llama4TextConfig(
        **{k: raw[k] for k in keys}, attn_temperature_tuning=True, rope_parameters=rope
    )
    return {**cfg.to_dict(), "architectures": ["Llama4ForCausalLM"]}


def test_scout_layout_matches_the_registry():
    hf = scout_config()
    want = get_layout("llama-4-scout")  # bfloat16 KV: 36 chunked (8192) + 12 full layers
    # as published: `attn_temperature_tuning: 4`; and the multimodal config.json nesting it
    multimodal = transformers.Llama4Config(text_config=transformers.Llama4TextConfig(**hf))
    variants = (
        hf,
        {**hf, "attn_temperature_tuning": 4},
        {**multimodal.to_dict(), "architectures": ["Llama4ForConditionalGeneration"]},
    )
    for config in variants:
        cfg = decoder_config(config)
        got = cfg.layout(kv_dtype="bfloat16")
        assert got.num_layers == want.num_layers == 48
        assert got.layers == want.layers  # kind, chunk, kv heads, head_dim, dtype per layer
        assert cfg.nope_temperature == (8192.0, 0.1) and cfg.local_rope.factor == 8.0
        assert cfg.moe_layers == tuple(range(48)) and cfg.moe.top_k == 1


def test_bad_checkpoints_are_named(checkpoint, tmp_path):
    config = json.loads((checkpoint / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in checkpoint.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())

    def refused(match: str, **change):
        (bad / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(CheckpointError, match=match):
            load_hf_checkpoint(bad)

    refused("hidden_act='gelu' is not implemented", hidden_act="gelu")
    refused("no_rope_layers.*not implemented", no_rope_layers=[1, 1, 0, 1])
    refused("need attention_chunk_size", attention_chunk_size=None)
    refused("quantization_config", quantization_config={"quant_method": "fbgemm_fp8"})
    refused(r"layers\.[13]\.feed_forward\.\S+: expected shape", intermediate_size=24)
    refused(r"missing tensors.*layers\.3\.feed_forward\.gate_proj", moe_layers=[1])

    # a fused expert tensor whose gate/up halves cannot be split
    (bad / "config.json").write_text(json.dumps(config))
    name = "model.layers.1.feed_forward.experts.gate_up_proj"
    index = json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"]
    shard = bad / index[name]
    tensors = load_file(shard)
    tensors[name] = np.concatenate([tensors[name], tensors[name][..., :1]], axis=-1)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="gate_up_proj's last axis is odd"):
        load_hf_checkpoint(bad)
