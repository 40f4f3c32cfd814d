"""A Llama-3.2-Vision checkpoint saved by transformers loads its language model and
cross-attention layers with the same logits, and the paged engine generates what
transformers generates (greedy) from the same image features; the layout of the
published config matches the registry.

Images: transformers' vision tower and projector give `cross_attention_states`
[B, max_tiles * num_patches, hidden]; an Image carries the rows of its real tiles.
Prompts start with the image token (the layout models/hf/mllama.py supports).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need the hf extra (torch)")
transformers = pytest.importorskip("transformers", reason="parity tests need transformers")
pytest.importorskip("safetensors", reason="parity tests need safetensors")

from hf_parity import engine_greedy, hf_greedy, perturb, relative_error, save  # noqa: E402
from jenga_jax import Engine, SamplingParams  # noqa: E402
from jenga_jax.core.errors import RequestError  # noqa: E402
from jenga_jax.core.registry import get_config, get_layout  # noqa: E402
from jenga_jax.engine.model_runner import Image  # noqa: E402
from models.config import CROSS, FULL  # noqa: E402
from models.hf import CheckpointError, decoder_config, load_hf_checkpoint  # noqa: E402

VOCAB, HIDDEN, IMAGE = 128, 64, 128  # the image token: the first extra embedding row
PATCHES, MAX_TILES = 5, 4  # (image_size 8 // patch_size 4) ** 2 + 1 class token
TILES = {2: 2, 6: 4}  # aspect ratio id -> tiles ([1, 2] and [2, 2] of the default ratios)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    text = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=5,
        num_attention_heads=4, num_key_value_heads=1, cross_attention_layers=[1, 3],
        max_position_embeddings=256, rms_norm_eps=1e-5, pad_token_id=0,
        rope_parameters=dict(rope_type="llama3", rope_theta=500_000.0, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=64),
    )  # fmt: skip
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_global_layers=1,
        attention_heads=2, image_size=8, patch_size=4, max_num_tiles=MAX_TILES,
        intermediate_layers_indices=[0], vision_output_dim=32,
    )  # fmt: skip
    cfg = transformers.MllamaConfig(text_config=text, vision_config=vision, image_token_index=IMAGE)
    model = perturb(torch, transformers.MllamaForConditionalGeneration(cfg))
    with torch.no_grad():  # fresh gates are 0 (cross layers off): make both branches count
        for layer, (attn, mlp) in zip((1, 3), ((0.8, -0.6), (-0.7, 0.9))):
            block = model.model.language_model.layers[layer]
            block.cross_attn_attn_gate.fill_(attn)
            block.cross_attn_mlp_gate.fill_(mlp)
    return model


@pytest.fixture(scope="module")
def checkpoint(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("mllama")
    save(hf_model, path, max_shard_size="100KB")  # several shards + index
    assert (path / "model.safetensors.index.json").is_file()
    return path


@pytest.fixture(scope="module")
def ours(checkpoint):
    return load_hf_checkpoint(checkpoint)


def prompts(seed: int, n: int, length: int) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(3, VOCAB, (n, length))
    ids[:, 0] = IMAGE
    return ids


def cross_mask(tiles: list[int], length: int):
    """transformers' cross_attention_mask [B, T, 1 image, max_tiles]: every row sees the
    image's real tiles (the processor's mask for a prompt starting with <|image|>)."""
    mask = torch.zeros(len(tiles), length, 1, MAX_TILES, dtype=torch.long)
    for b, t in enumerate(tiles):
        mask[b, :, 0, :t] = 1
    return mask


def test_config_reads_the_text_model(ours):
    cfg = ours.cfg
    assert cfg.layer_types == (FULL, CROSS, FULL, CROSS, FULL)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 1, 16)  # GQA 4:1
    assert (cfg.vocab_size, cfg.num_embeddings, cfg.image_token_id) == (VOCAB, VOCAB + 8, IMAGE)
    assert cfg.vision_dim == HIDDEN and cfg.rope.scaling == "llama3"


def test_logits_match_transformers(hf_model, ours):
    """Rows: an image of 2 tiles, no image, an image of 4 tiles. The padding tiles'
    states are random: transformers masks them, our rows do not hold them."""
    t = 24
    ids = prompts(0, 3, t)
    states = torch.randn(3, MAX_TILES * PATCHES, HIDDEN, generator=torch.Generator().manual_seed(1))
    lens = np.array([2 * PATCHES, 0, 4 * PATCHES])
    with torch.no_grad():
        img = [0, 2]
        ref_img = hf_model(
            input_ids=torch.tensor(ids[img]), cross_attention_states=states[img],
            cross_attention_mask=cross_mask([2, 4], t),
        ).logits.numpy()  # fmt: skip
        ref_text = hf_model(input_ids=torch.tensor(ids[1:2])).logits.numpy()  # skips cross layers
    ref = np.stack([ref_img[0], ref_text[0], ref_img[1]])
    embeds = states.numpy().copy()
    embeds[1] = 0.0
    got = np.asarray(ours.forward_dense(ids, embeds, lens))
    assert relative_error(got, ref) <= 1e-4
    # the images matter: without them every row but the text-only one changes
    blind = np.asarray(ours.forward_dense(ids, embeds, np.zeros(3, np.int32)))
    assert relative_error(blind[[0, 2]], ref[[0, 2]]) > 1e-2


def test_paged_engine_generates_what_transformers_generates(hf_model, ours):
    """Two prompts with an image (2 and 4 tiles), one without; transformers generates from
    pixels, our engine from the projected features of the same tiles."""
    t, ratio_ids = 20, [2, 6]
    ids = prompts(3, 3, t)
    gen = torch.Generator().manual_seed(4)
    pixels = torch.randn(2, 1, MAX_TILES, 3, 8, 8, generator=gen)
    ratios = torch.tensor([[r] for r in ratio_ids])
    tiles = [TILES[r] for r in ratio_ids]
    ratio_mask = torch.tensor([[[1] * n + [0] * (MAX_TILES - n)] for n in tiles])
    with torch.no_grad():
        vision = hf_model.model.vision_model(
            pixel_values=pixels, aspect_ratio_ids=ratios, aspect_ratio_mask=ratio_mask
        ).last_hidden_state  # [2, 1, tiles, patches, vision_output_dim]
        states = hf_model.model.multi_modal_projector(vision).reshape(2, -1, HIDDEN).numpy()
    img = [0, 2]
    want = hf_greedy(
        torch, hf_model, ids[img], 32, pixel_values=pixels, aspect_ratio_ids=ratios,
        aspect_ratio_mask=ratio_mask, cross_attention_mask=cross_mask(tiles, t),
    )  # fmt: skip
    want.insert(1, hf_greedy(torch, hf_model, ids[1:2], 32)[0])
    images = [Image(f"im{b}", states[b, : n * PATCHES]) for b, n in enumerate(tiles)]
    got = engine_greedy(ours, ids, 32, images=[[images[0]], None, [images[1]]])
    assert got == want


def test_engine_refuses_what_it_cannot_compute(ours):
    engine = Engine(ours, num_large_pages=16, max_model_len=64)
    image = Image("im", np.ones((PATCHES, HIDDEN), np.float32))
    params = SamplingParams(max_tokens=4)
    ok = prompts(5, 1, 8)[0].tolist()
    with pytest.raises(RequestError, match=rf"embeddings must be \[num_tokens >= 1, {HIDDEN}\]"):
        engine.add_request(ok, params, [Image("narrow", np.ones((PATCHES, 32), np.float32))])
    chat = [1, 7, 9, IMAGE, 11, 12]  # BOS and a header before the image: left out
    with pytest.raises(RequestError, match=r"one image per request.*image tokens at \[3\]"):
        engine.add_request(chat, params, [image])
    with pytest.raises(RequestError, match=r"got 2 images"):
        engine.add_request([IMAGE, IMAGE, 5, 6], params, [image, Image("b", image.embeds)])
    with pytest.raises(RequestError, match=r"token ids must be ints in \[0, 136\)"):
        engine.add_request([IMAGE, VOCAB + 8], params, [image])
    engine.add_request(ok, params, [image])  # the supported layout
    engine.add_request(chat, params)  # text only: any layout


def test_layout_of_the_published_config_equals_the_registry():
    facts = get_config("llama-3.2-11b-vision").raw
    keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
            "cross_attention_layers", "vocab_size", "max_position_embeddings")  # fmt: skip
    rope = dict(
        rope_type=facts["rope_scaling_type"], rope_theta=facts["rope_theta"],
        factor=facts["rope_scaling_factor"], low_freq_factor=facts["rope_scaling_low_freq_factor"],
        high_freq_factor=facts["rope_scaling_high_freq_factor"],
        original_max_position_embeddings=facts["rope_scaling_original_max_position_embeddings"],
    )  # fmt: skip
    text = transformers.MllamaTextConfig(**{k: facts[k] for k in keys}, rope_parameters=rope)
    vision = transformers.MllamaVisionConfig(
        image_size=facts["vision_image_size"], patch_size=facts["vision_patch_size"],
        max_num_tiles=facts["vision_max_num_tiles"], hidden_size=facts["vision_hidden_size"],
        vision_output_dim=facts["vision_output_dim"],
    )  # fmt: skip
    hf = {
        **transformers.MllamaConfig(text_config=text, vision_config=vision).to_dict(),
        "architectures": ["MllamaForConditionalGeneration"],
    }
    cfg = decoder_config(hf)
    assert cfg.layout(kv_dtype="bfloat16").layers == get_layout("llama-3.2-11b-vision").layers
    assert cfg.head_dim == facts["head_dim"] and cfg.vision_dim == facts["hidden_size"]
    assert (cfg.num_embeddings, cfg.image_token_id) == (128256 + 8, 128256)
    assert cfg.rope.original_max_position == 8192


def test_bad_checkpoints_are_named(checkpoint, tmp_path):
    config = json.loads((checkpoint / "config.json").read_text())
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in checkpoint.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())

    def write(text=None, weight_map=None, **top):
        cfg = {**config, **top, "text_config": {**config["text_config"], **(text or {})}}
        (bad / "config.json").write_text(json.dumps(cfg))
        (bad / "model.safetensors.index.json").write_text(
            json.dumps({**index, "weight_map": weight_map or index["weight_map"]})
        )

    write(text={"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}})
    with pytest.raises(CheckpointError, match="rope scaling 'dynamic' is not implemented"):
        load_hf_checkpoint(bad)
    write(text={"hidden_act": "gelu"})
    with pytest.raises(CheckpointError, match="hidden_act='gelu' is not implemented"):
        load_hf_checkpoint(bad)
    write(text={"cross_attention_layers": [1, 5]})
    with pytest.raises(CheckpointError, match=r"cross_attention_layers \[1, 5\] out of"):
        load_hf_checkpoint(bad)
    write(image_token_index=VOCAB + 8)
    with pytest.raises(CheckpointError, match="image_token_index 136 is not an embedding row"):
        load_hf_checkpoint(bad)
    gate = "language_model.model.layers.3.cross_attn_mlp_gate"
    write(weight_map={k: v for k, v in index["weight_map"].items() if k != gate})
    with pytest.raises(CheckpointError, match=rf"missing tensors \['{gate}'\]"):
        load_hf_checkpoint(bad)
    write(text={"cross_attention_layers": [1]})  # layer 3's cross tensors are unexpected
    with pytest.raises(CheckpointError, match=r"unexpected.*layers\.3\.cross_attn"):
        load_hf_checkpoint(bad)
