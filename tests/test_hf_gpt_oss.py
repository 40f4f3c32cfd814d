"""A gpt-oss checkpoint saved by transformers loads into the flax model with the same
logits, and the paged engine generates what transformers generates (greedy).

The tiny model keeps what breaks naive ports: a sliding window (16) shorter than the
prompt plus generation, GQA (4 query heads on 2 KV heads), perturbed sinks and biases,
YaRN with a small original context (frequencies and the cos/sin scale change), 2 of
4 experts per token, and a swiglu_limit small enough that the clamp binds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need the hf extra (torch)")
transformers = pytest.importorskip("transformers", reason="parity tests need transformers")
pytest.importorskip("safetensors", reason="parity tests need safetensors")

from hf_parity import engine_greedy, hf_greedy, perturb, relative_error, save  # noqa: E402
from jenga_jax.core.registry import get_config, get_layout  # noqa: E402
from models.config import FULL, SLIDING  # noqa: E402
from models.hf import (  # noqa: E402
    CheckpointError,
    decoder_config,
    load_hf_checkpoint,
    mxfp4,  # noqa: E402
)
from models.rope import attention_factor, inv_frequencies  # noqa: E402

VOCAB = 128
YARN = dict(
    rope_type="yarn", rope_theta=1000.0, factor=4.0, beta_fast=32.0, beta_slow=1.0,
    truncate=False, original_max_position_embeddings=64,
)  # fmt: skip


def tiny_config(**overrides):
    kw = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=16, max_position_embeddings=256,
        rope_parameters=dict(YARN), swiglu_limit=0.5, swiglu_alpha=1.5, rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.GptOssConfig(**{**kw, **overrides})


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return perturb(torch, transformers.GptOssForCausalLM(tiny_config()))


@pytest.fixture(scope="module")
def checkpoint(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt_oss")
    save(hf_model, path, max_shard_size="100KB")  # several shards + index
    assert (path / "model.safetensors.index.json").is_file()
    return path


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def test_logits_match_transformers(hf_model, checkpoint):
    ours = load_hf_checkpoint(checkpoint)
    cfg = ours.cfg
    assert cfg.layer_types == (SLIDING, FULL, SLIDING, FULL) and cfg.window == 16
    assert cfg.sinks and cfg.attn_bias and cfg.moe.swiglu_limit == 0.5
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 56))  # 56 > window 16
    ref = hf_logits(hf_model, ids)
    assert relative_error(ours.forward_dense(ids), ref) <= 1e-4


def test_the_swiglu_clamp_binds(hf_model):
    """Without the clamp transformers' logits change: the parity test covers it."""
    ids = np.random.default_rng(0).integers(0, VOCAB, (1, 32))
    experts = [layer.mlp.experts for layer in hf_model.model.layers]
    clamped, limit = hf_logits(hf_model, ids), experts[0].limit
    try:
        for e in experts:
            e.limit = 1e9
        unclamped = hf_logits(hf_model, ids)
    finally:
        for e in experts:
            e.limit = limit
    assert relative_error(unclamped, clamped) > 1e-2


def test_paged_engine_generates_what_transformers_generates(hf_model, checkpoint):
    prompts = np.random.default_rng(5).integers(0, VOCAB, (3, 20))  # 20 + 32 > window 16
    got = engine_greedy(load_hf_checkpoint(checkpoint), prompts, 32)
    assert got == hf_greedy(torch, hf_model, prompts, 32)


@pytest.mark.parametrize(
    "rope",
    [
        YARN,
        {**YARN, "truncate": True},
        {**YARN, "rope_theta": 150_000.0, "factor": 32.0, "beta_fast": 16.0, "beta_slow": 2.0},
        {**YARN, "attention_factor": 1.25, "original_max_position_embeddings": 32},
    ],
)
def test_yarn_frequencies_equal_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = tiny_config(rope_parameters=dict(rope))
    ref_inv, ref_scale = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
    ours = decoder_config({**hf_cfg.to_dict(), "architectures": ["GptOssForCausalLM"]}).rope
    inv = inv_frequencies(ours, 16)
    np.testing.assert_allclose(inv, ref_inv.double().numpy(), rtol=1e-6, atol=0)
    assert attention_factor(ours) == pytest.approx(ref_scale, rel=1e-12) and ref_scale != 1.0
    plain = 1.0 / rope["rope_theta"] ** (np.arange(0, 16, 2) / 16)
    assert np.abs(inv / plain - 1).max() > 0.5  # the scaling changes frequencies


@pytest.mark.parametrize("name", ["gpt-oss-20b", "gpt-oss-120b"])
def test_layout_of_the_published_config_equals_the_registry(name):
    facts = get_config(name).raw
    sizes = {
        k: facts[k]
        for k in (
            "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
            "head_dim", "sliding_window", "layer_types", "num_local_experts",
            "num_experts_per_tok", "vocab_size", "max_position_embeddings",
        )
    }  # fmt: skip
    rope = dict(
        rope_type=facts["rope_scaling_type"], rope_theta=facts["rope_theta"],
        factor=facts["rope_scaling_factor"], beta_fast=facts["rope_scaling_beta_fast"],
        beta_slow=facts["rope_scaling_beta_slow"], truncate=facts["rope_scaling_truncate"],
        original_max_position_embeddings=facts["rope_scaling_original_max_position_embeddings"],
    )  # fmt: skip
    hf = {
        **transformers.GptOssConfig(**sizes, rope_parameters=rope).to_dict(),
        "architectures": ["GptOssForCausalLM"],
    }
    want = get_layout(name, kv_dtype="bfloat16").layers
    cfg = decoder_config(hf)
    assert cfg.layout(kv_dtype="bfloat16").layers == want
    assert (cfg.moe.num_experts, cfg.moe.top_k) == (facts["num_local_experts"], 4)
    assert cfg.rope.scaling == "yarn" and cfg.rope.factor == 32 and not cfg.rope.truncate
    # transformers' default layer pattern, and the published (pre-v5) rope keys, read the same
    old_style = {k: v for k, v in hf.items() if k not in ("layer_types", "rope_parameters")}
    old_style["rope_theta"] = rope.pop("rope_theta")
    old_style["rope_scaling"] = rope
    assert decoder_config(old_style).layout(kv_dtype="bfloat16").layers == want
    assert decoder_config(old_style).rope == cfg.rope


def mxfp4_checkpoint(checkpoint, dst):
    """The checkpoint with every expert weight stored as MXFP4 blocks and scales, as the
    published gpt-oss checkpoints are (quantized here with models.hf.mxfp4.quantize)."""
    from safetensors.numpy import load_file, save_file

    tensors = {}
    for file in checkpoint.glob("*.safetensors"):
        tensors.update(load_file(file))
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = mxfp4.quantize(tensors.pop(name))
    dst.mkdir()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((checkpoint / "config.json").read_text())
    unquantized = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens"]
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [*unquantized, "lm_head"],
    }
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_mxfp4_experts_load_as_transformers_loads_them(hf_model, checkpoint, tmp_path):
    quantized = mxfp4_checkpoint(checkpoint, tmp_path / "mxfp4")
    ours = load_hf_checkpoint(quantized)
    ref_model = transformers.GptOssForCausalLM.from_pretrained(
        quantized, quantization_config=transformers.Mxfp4Config(dequantize=True),
        dtype=torch.float32,
    ).eval()  # fmt: skip
    ids = np.random.default_rng(2).integers(0, VOCAB, (2, 40))
    got = ours.forward_dense(ids)
    assert relative_error(got, hf_logits(ref_model, ids)) <= 1e-4
    assert relative_error(got, hf_logits(hf_model, ids)) > 1e-2  # MXFP4 values were read
    blocks, scales = mxfp4.quantize(np.random.default_rng(3).normal(size=(2, 64, 48)))
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    ref = convert_moe_packed_tensors(
        torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32
    )
    assert np.array_equal(mxfp4.dequantize(blocks, scales), ref.numpy())


def copy_checkpoint(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_bad_checkpoints_are_named(checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file

    config = json.loads((checkpoint / "config.json").read_text())
    bad = copy_checkpoint(checkpoint, tmp_path / "bad")

    def refused(match, **changes):
        (bad / "config.json").write_text(json.dumps({**config, **changes}))
        with pytest.raises(CheckpointError, match=match):
            load_hf_checkpoint(bad)

    refused("mscale", rope_parameters={**config["rope_parameters"], "mscale": 1.0})
    refused("hidden_act='gelu' is not implemented", hidden_act="gelu")
    refused(
        "quantization_config \\(bitsandbytes\\)",
        quantization_config={"quant_method": "bitsandbytes"},
    )
    refused("chunked_attention", layer_types=["chunked_attention"] + config["layer_types"][1:])
    refused("no sliding_window", sliding_window=None)

    # an expert tensor with one expert too few, config unchanged
    (bad / "config.json").write_text(json.dumps(config))
    name = "model.layers.1.mlp.experts.down_proj"
    shard = bad / json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = tensors[name][:3]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=rf"{name}: expected shape \(4, 32, 64\).*\(3, 32, 64\)"
    ):
        load_hf_checkpoint(bad)


def test_tied_embeddings_without_attention_bias(tmp_path):
    torch.manual_seed(1)
    cfg = tiny_config(
        num_hidden_layers=2, tie_word_embeddings=True, attention_bias=False,
        layer_types=["full_attention", "sliding_attention"],
    )  # fmt: skip
    hf_model = perturb(torch, transformers.GptOssForCausalLM(cfg), seed=1)
    ours = load_hf_checkpoint(save(hf_model, tmp_path))
    assert ours.cfg.tie_embeddings and not ours.cfg.attn_bias
    ids = np.random.default_rng(2).integers(0, VOCAB, (2, 56))  # shapes as above: no new compiles
    assert relative_error(ours.forward_dense(ids), hf_logits(hf_model, ids)) <= 1e-4
