"""A Jamba checkpoint saved by transformers (Mamba + attention layers, sparse MoE) loads
into the flax model with the same logits, and the paged engine, carrying Mamba states
across prefill chunks, generates what transformers generates (greedy)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="parity tests need the hf extra (torch)")
transformers = pytest.importorskip("transformers", reason="parity tests need transformers")
pytest.importorskip("safetensors", reason="parity tests need safetensors")

from hf_parity import engine_greedy, hf_greedy, perturb, relative_error, save  # noqa: E402
from jenga_jax.core.registry import get_config, get_layout  # noqa: E402
from jenga_jax.device import mamba  # noqa: E402
from jenga_jax.engine.scheduler import SchedulerConfig  # noqa: E402
from models.config import FULL, STATE  # noqa: E402
from models.hf import CheckpointError, load_hf_checkpoint  # noqa: E402 (after the skips)
from models.hf.registry import decoder_config  # noqa: E402

VOCAB = 128
# eos_token_id=None: with an EOS, `generate(min_new_tokens=...)` bans that token, which
# our engine (no stop tokens) may pick.
TINY = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
    mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, eos_token_id=None, bos_token_id=None,
)  # fmt: skip


def _forward(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def _ours(model, ids):
    """forward_dense, jitted: eager dispatch of the Mamba scans is the slower path here."""
    return nnx.jit(lambda m, x: m.forward_dense(x))(model, ids)


@pytest.fixture(scope="module")
def hf_model():
    """Layers: mamba, attention+MoE, mamba, mamba+MoE; GQA 4:2; top 2 of 4 experts."""
    torch.manual_seed(0)
    cfg = transformers.JambaConfig(
        **TINY, num_hidden_layers=4, num_key_value_heads=2, num_experts=4,
        num_experts_per_tok=2, attn_layer_period=4, attn_layer_offset=1,
        expert_layer_period=2, expert_layer_offset=1, mamba_dt_rank=8,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    )  # fmt: skip
    assert cfg.layers_block_type == ["mamba", "attention", "mamba", "mamba"]
    assert cfg.layers_num_experts == [1, 4, 1, 4]
    return perturb(torch, transformers.JambaForCausalLM(cfg))


@pytest.fixture(scope="module")
def checkpoint(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("jamba")
    save(hf_model, path, max_shard_size="100KB")  # several shards + index
    assert (path / "model.safetensors.index.json").is_file()
    return path


def test_config_layers(checkpoint):
    cfg = decoder_config(json.loads((checkpoint / "config.json").read_text()))
    assert cfg.layer_types == (STATE, FULL, STATE, STATE)
    assert cfg.moe_layers == (1, 3) and cfg.moe.top_k == 2 and cfg.moe.num_experts == 4
    assert cfg.rope is None and cfg.num_kv_heads == 2 and cfg.norm_eps == 1e-5


@pytest.fixture(scope="module")
def ours(checkpoint):
    return load_hf_checkpoint(checkpoint)


def test_logits_match_transformers(hf_model, ours):
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 48))
    assert relative_error(_ours(ours, ids), _forward(hf_model, ids)) <= 1e-4


def test_mamba_mixer_and_states_match_transformers(hf_model, ours):
    """Layer 3's mixer over 20 tokens in two chunks of 10 (state carried) against one pass of
    JambaMambaMixer with a cache: outputs and the final conv and ssm states."""
    layer = 3
    x = np.random.default_rng(3).normal(size=(1, 20, 64)).astype(np.float32)
    cache = transformers.DynamicCache(config=hf_model.config)
    with torch.no_grad():
        y_ref = hf_model.model.layers[layer].mamba(torch.tensor(x), cache_params=cache)
    conv_ref = cache.get_conv_state(layer).numpy()[0]  # [d_inner, d_conv]: last d_conv inputs
    ssm_ref = cache.get_recurrent_state(layer).numpy()[0]  # [d_inner, d_state]
    params = ours.blocks[layer].mixer.params()
    conv, ssm = mamba.zero_state(params)
    step = jax.jit(mamba.mamba_forward)
    y1, conv, ssm = step(params, x[0, :10], conv, ssm)
    y2, conv, ssm = step(params, x[0, 10:], conv, ssm)
    assert relative_error(np.concatenate([y1, y2]), y_ref.numpy()[0]) <= 1e-4
    assert relative_error(ssm, ssm_ref) <= 1e-4
    assert relative_error(conv, conv_ref[:, 1:].T) <= 1e-4  # ours keeps d_conv - 1


def test_paged_engine_generates_what_transformers_generates(hf_model, ours):
    # 40-token prompts in prefill chunks of 16: Mamba states cross two chunk boundaries
    # (and are checkpointed every 16 tokens) before 32 decode steps.
    prompts = np.random.default_rng(1).integers(0, VOCAB, (3, 40))
    sched = SchedulerConfig(max_num_batched_tokens=64, max_prefill_chunk=16)
    got = engine_greedy(ours, prompts, 32, scheduler=sched, checkpoint_interval=16)
    assert got == hf_greedy(torch, hf_model, prompts, 32)


def test_tied_mqa_dense_mlp_auto_dt_rank(tmp_path):
    """num_experts == 1 (plain MLPs), tied embeddings, one KV head, dt_rank "auto",
    layers_block_type given explicitly, a single safetensors file."""
    torch.manual_seed(1)
    cfg = transformers.JambaConfig(
        **TINY, num_hidden_layers=3, num_key_value_heads=1, num_experts=1,
        attn_layer_period=3, attn_layer_offset=2, tie_word_embeddings=True,
    )  # fmt: skip
    model = perturb(torch, transformers.JambaForCausalLM(cfg), seed=1)
    save(model, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(
        json.dumps(
            {**hf, "layers_block_type": ["mamba", "mamba", "attention"], "mamba_dt_rank": "auto"}
        )
    )
    ours = load_hf_checkpoint(tmp_path)
    assert ours.cfg.moe is None and ours.cfg.tie_embeddings and ours.cfg.mamba.dt_rank == 4
    ids = np.random.default_rng(2).integers(0, VOCAB, (2, 24))
    assert relative_error(_ours(ours, ids), _forward(model, ids)) <= 1e-4


def test_layout_matches_registry():
    """Jamba-1.5-Mini's published sizes: kinds per layer as the registry has them.
    The registry's state is vLLM's conv (d_conv - 1) x d_inner + ssm d_inner x d_state,
    in bfloat16, the same count as DecoderConfig.state_layer_elems."""
    raw = get_config("jamba-1.5-mini").raw
    keys = (
        "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
        "attn_layer_period", "attn_layer_offset", "expert_layer_period", "expert_layer_offset",
        "num_experts", "num_experts_per_tok", "mamba_d_state", "mamba_d_conv", "mamba_expand",
        "mamba_dt_rank", "vocab_size", "max_position_embeddings",
    )  # fmt: skip
    hf = transformers.JambaConfig(**{k: raw[k] for k in keys}).to_dict()
    cfg = decoder_config({**hf, "architectures": ["JambaForCausalLM"]})
    assert cfg.state_layer_elems() == raw["mamba_state_elems_per_layer_vllm"]
    assert cfg.moe_layers == tuple(raw["moe_layers"]) and cfg.head_dim == raw["head_dim"]
    ours, ref = cfg.layout(kv_dtype="bfloat16"), get_layout("jamba-1.5-mini")
    assert ours.layers == ref.layers  # type, heads, head_dim, dtype, state bytes per layer
    assert [i for i, k in enumerate(ours.layers) if k.type is FULL] == raw["attention_layers"]


def _variant(checkpoint, path, **changes):
    path.mkdir(exist_ok=True)
    for f in checkpoint.iterdir():
        if f.name != "config.json":
            (path / f.name).write_bytes(f.read_bytes())
    config = json.loads((checkpoint / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"mamba_proj_bias": True}, "mamba_proj_bias=True is not implemented"),
        ({"mamba_conv_bias": False}, "mamba_conv_bias=False is not implemented"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not implemented"),
        ({"attn_layer_offset": 4}, "attn_layer_offset"),
        ({"layers_block_type": ["mamba", "moe", "mamba", "mamba"]}, "unknown layers_block"),
        ({"mamba_d_conv": 3}, r"mamba\.conv1d\.weight: expected shape"),
        ({"expert_layer_offset": 0}, "missing tensors.*layers.0.feed_forward.experts"),
    ],
)
def test_unsupported_options_and_bad_tensors_are_named(checkpoint, tmp_path, changes, message):
    with pytest.raises(CheckpointError, match=message):
        load_hf_checkpoint(_variant(checkpoint, tmp_path / "bad", **changes))
