"""A Llama checkpoint saved by transformers loads into the flax model with the same
logits, and the paged engine generates what transformers generates (greedy)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need the hf extra (torch)")
transformers = pytest.importorskip("transformers", reason="parity tests need transformers")
pytest.importorskip("safetensors", reason="parity tests need safetensors")

from hf_parity import engine_greedy, hf_greedy, perturb, relative_error, save  # noqa: E402
from models.hf import CheckpointError, load_hf_checkpoint  # noqa: E402 (after the skips)

VOCAB = 128


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rope_theta=500_000.0, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=64),
    )  # fmt: skip
    return perturb(torch, transformers.LlamaForCausalLM(cfg))


@pytest.fixture(scope="module")
def checkpoint(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    save(hf_model, path, max_shard_size="100KB")  # several shards + index
    assert (path / "model.safetensors.index.json").is_file()
    return path


def test_logits_match_transformers(hf_model, checkpoint):
    ours = load_hf_checkpoint(checkpoint)
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 48))
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids)).logits.float().numpy()
    assert relative_error(ours.forward_dense(ids), ref) <= 1e-4


def test_paged_engine_generates_what_transformers_generates(hf_model, checkpoint):
    prompts = np.random.default_rng(1).integers(0, VOCAB, (3, 20))
    got = engine_greedy(load_hf_checkpoint(checkpoint), prompts, 32)
    assert got == hf_greedy(torch, hf_model, prompts, 32)


def test_bad_checkpoints_are_named(checkpoint, tmp_path):
    config = json.loads((checkpoint / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in checkpoint.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text(json.dumps({**config, "architectures": ["FooForCausalLM"]}))
    with pytest.raises(CheckpointError, match="FooForCausalLM"):
        load_hf_checkpoint(bad)
    (bad / "config.json").write_text(json.dumps({**config, "intermediate_size": 80}))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight: expected shape"):
        load_hf_checkpoint(bad)
    (bad / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4}))
    with pytest.raises(CheckpointError, match="missing tensors.*layers.3"):
        load_hf_checkpoint(bad)
    (bad / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    with pytest.raises(CheckpointError, match="unexpected.*layers.2"):
        load_hf_checkpoint(bad)
