"""Gemma-2 and Gemma-3 checkpoints saved by transformers load with the same logits, and
the paged engine generates what transformers generates (greedy): sliding windows shorter
than prompt + generation, GQA, binding soft-caps (Gemma-2), q/k norms and two RoPEs with
linear scaling on the global layers (Gemma-3), the language model of a Gemma-3 image
checkpoint; the layouts of the real configs match the registry."""

from __future__ import annotations

import copy
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
from models.config import FULL, SLIDING, RopeConfig  # noqa: E402
from models.hf import CheckpointError, decoder_config, load_hf_checkpoint  # noqa: E402

VOCAB = 128
# the dense forward, compiled whole (faster here than op by op)
forward_dense = nnx.jit(lambda model, ids: model.forward_dense(ids))
PROMPT_VOCAB = 120  # below the image token ids of the Gemma-3 image model
ATTN_CAP, FINAL_CAP = 0.5, 1.0  # Gemma-2 soft-caps, small enough to bind
# no EOS id: the engine runs without stop ids, transformers' generate would stop at EOS
# (token 2 for Mistral, at times a tiny model's argmax)
_TINY = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
    eos_token_id=None,
)  # fmt: skip
_GEMMA3_ROPE = {  # global layers: base 1e5, linear x8; sliding layers: base 1e4
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 100_000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
}


def _gemma2():
    # sliding (8) / full alternating, 2 kv heads, both soft-caps, q/k/v/o biases, untied head
    return transformers.Gemma2ForCausalLM(
        transformers.Gemma2Config(
            **_TINY, num_hidden_layers=2, num_key_value_heads=2, head_dim=16,
            query_pre_attn_scalar=24, sliding_window=8, attn_logit_softcapping=ATTN_CAP,
            final_logit_softcapping=FINAL_CAP, attention_bias=True, tie_word_embeddings=False,
        )
    )  # fmt: skip


def _gemma3_text() -> dict:
    # 4 query heads on 1 kv head, head_dim 32, final soft-cap, tied head
    return dict(
        _TINY, num_hidden_layers=2, num_key_value_heads=1, head_dim=32,
        query_pre_attn_scalar=32, sliding_window=16, final_logit_softcapping=3.0,
        rope_parameters=copy.deepcopy(_GEMMA3_ROPE),
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip


def _gemma3():
    return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**_gemma3_text()))


def _gemma3_image():
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=28, patch_size=14,
    )  # fmt: skip
    # the language model of _gemma3; transformers applies no final soft-cap here
    config = transformers.Gemma3Config(
        text_config=_gemma3_text(), vision_config=vision, mm_tokens_per_image=4,
        image_token_index=127, boi_token_index=125, eoi_token_index=126,
    )  # fmt: skip
    return transformers.Gemma3ForConditionalGeneration(config)


BUILDERS = {"gemma2": _gemma2, "gemma3": _gemma3, "gemma3_image": _gemma3_image}
WANT_TYPES = {
    "gemma2": (SLIDING, FULL),
    "gemma3": (SLIDING, FULL),
    "gemma3_image": (SLIDING, FULL),
}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def saved(request, tmp_path_factory):
    """(name, perturbed transformers model, checkpoint dir)."""
    torch.manual_seed(0)
    model = perturb(torch, BUILDERS[request.param]())
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "gemma2":
        save(model, path, max_shard_size="100KB")  # several shards + index
        assert (path / "model.safetensors.index.json").is_file()
    else:
        save(model, path)
    return request.param, model, path


def _ids(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, PROMPT_VOCAB, shape)


def _reference_logits(hf_model, ids) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor(ids)).logits.float().numpy()


def test_logits_match_transformers(saved):
    name, hf_model, path = saved
    ours = load_hf_checkpoint(path)
    assert ours.cfg.layer_types == WANT_TYPES[name]
    ids = _ids(0, (2, 48))  # longer than the windows
    assert relative_error(forward_dense(ours, ids), _reference_logits(hf_model, ids)) <= 1e-4


# gemma3_image has gemma3's language model: its logits test covers its tensor names
@pytest.mark.parametrize("saved", ["gemma2", "gemma3"], indirect=True)
def test_paged_engine_generates_what_transformers_generates(saved):
    name, hf_model, path = saved
    prompts = _ids(1, (3, 20))  # 20 + 32 > window
    got = engine_greedy(load_hf_checkpoint(path), prompts, 32)
    assert got == hf_greedy(torch, hf_model, prompts, 32)


def _copy_with(checkpoint, tmp_path, **changes):
    copy = tmp_path / "copy"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(checkpoint, copy)
    config = json.loads((checkpoint / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **changes}))
    return copy


@pytest.mark.parametrize("saved", ["gemma2"], indirect=True)
def test_gemma2_soft_caps_bind(saved, tmp_path):
    """Without either cap our logits move far from transformers': the parity test sees them."""
    name, hf_model, path = saved
    ids = _ids(0, (2, 48))
    ref = _reference_logits(hf_model, ids)
    assert np.abs(ref).max() <= FINAL_CAP
    for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
        uncapped = load_hf_checkpoint(_copy_with(path, tmp_path, **{cap: None}))
        assert relative_error(forward_dense(uncapped, ids), ref) > 1e-2, cap


def _hf_dict(cfg, arch: str) -> dict:
    return {**cfg.to_dict(), "architectures": [arch]}


GEMMA2_SIZES = {
    "gemma-2-9b": dict(
        hidden_size=3584, intermediate_size=14_336, num_hidden_layers=42,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
    ),
    "gemma-2-27b": dict(
        hidden_size=4608, intermediate_size=36_864, num_hidden_layers=46,
        num_attention_heads=32, num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=144,
    ),
}  # fmt: skip
GEMMA3_SIZES = {
    "gemma-3-4b": dict(
        hidden_size=2560, intermediate_size=10_240, num_hidden_layers=34,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
    ),
    "gemma-3-27b": dict(
        hidden_size=5376, intermediate_size=21_504, num_hidden_layers=62,
        num_attention_heads=32, num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=168,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(GEMMA2_SIZES))
def test_gemma2_layout_matches_registry(name):
    cfg = transformers.Gemma2Config(vocab_size=256_000, sliding_window=4096, **GEMMA2_SIZES[name])
    hf = _hf_dict(cfg, "Gemma2ForCausalLM")
    ours = decoder_config(hf)
    assert ours.layout(kv_dtype="bfloat16").layers == get_layout(name).layers
    assert (ours.attn_soft_cap, ours.final_soft_cap) == (50.0, 30.0)
    del hf["layer_types"]  # an older config.json: the family's rule gives the same
    assert decoder_config(hf).layer_types == ours.layer_types


@pytest.mark.parametrize("name", sorted(GEMMA3_SIZES))
def test_gemma3_layout_matches_registry(name):
    """The image model's config (as published); its text_config also read in the older
    form the hub files use (rope_scaling, no layer_types: transformers' defaults)."""
    sizes = GEMMA3_SIZES[name]
    text = transformers.Gemma3TextConfig(
        sliding_window=1024, rope_scaling={"rope_type": "linear", "factor": 8.0}, **sizes
    )
    hf = _hf_dict(transformers.Gemma3Config(text_config=text), "Gemma3ForConditionalGeneration")
    ours = decoder_config(hf)
    assert ours.layout(kv_dtype="bfloat16").layers == get_layout(name).layers
    assert ours.rope == RopeConfig(theta=1_000_000.0, scaling="linear", factor=8.0)
    assert ours.local_rope == RopeConfig(theta=10_000.0)
    old_text = {
        "model_type": "gemma3_text", "sliding_window": 1024,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0}, **sizes,
    }  # fmt: skip
    old = {"architectures": ["Gemma3ForConditionalGeneration"], "text_config": old_text}
    assert decoder_config(old) == ours


def test_gemma3_older_config_forms():
    """rope_theta / rope_local_base_freq / sliding_window_pattern (no layer_types) read
    as transformers reads them."""
    old = {
        **_TINY, "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "num_hidden_layers": 7, "num_key_value_heads": 2, "head_dim": 16,
        "rope_theta": 50_000.0, "rope_local_base_freq": 5_000.0, "sliding_window_pattern": 3,
        "rope_scaling": {"rope_type": "linear", "factor": 4.0}, "sliding_window": 8,
    }  # fmt: skip
    new = _hf_dict(transformers.Gemma3TextConfig.from_dict(old), "Gemma3ForCausalLM")
    assert new["layer_types"][:3] == ["sliding_attention", "sliding_attention", "full_attention"]
    ours = decoder_config(old)
    assert ours == decoder_config(new)
    assert ours.layer_types == (SLIDING, SLIDING, FULL) * 2 + (SLIDING,)
    assert ours.rope == RopeConfig(theta=50_000.0, scaling="linear", factor=4.0)
    assert ours.local_rope == RopeConfig(theta=5_000.0)


def test_bad_checkpoints_are_named(saved, tmp_path):
    name, _, path = saved
    text = json.loads((path / "config.json").read_text()).get("text_config")

    def changed(**changes):  # top level, or text_config for the image model
        if text is not None:
            changes = {"text_config": {**text, **changes}}
        return _copy_with(path, tmp_path, **changes)

    with pytest.raises(CheckpointError, match="hidden_activation='gelu' is not implemented"):
        load_hf_checkpoint(changed(hidden_activation="gelu"))
    with pytest.raises(CheckpointError, match="use_bidirectional_attention=True"):
        load_hf_checkpoint(changed(use_bidirectional_attention=True))
    with pytest.raises(CheckpointError, match="chunked_attention.*not implemented"):
        load_hf_checkpoint(changed(layer_types=["chunked_attention"] * len(WANT_TYPES[name])))
    with pytest.raises(CheckpointError, match=r"self_attn\.[qkv]_proj\.weight: expected shape"):
        load_hf_checkpoint(changed(head_dim=8))
    n = len(WANT_TYPES[name])
    with pytest.raises(CheckpointError, match=rf"missing tensors.*layers\.{n}\."):
        load_hf_checkpoint(changed(num_hidden_layers=n + 1, layer_types=None))
