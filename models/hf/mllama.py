"""Llama-3.2-Vision (`MllamaForConditionalGeneration`): the language model and its gated
cross-attention layers; the vision tower and the projector are not loaded.

The image input: an `Image(content_hash, embeds)` whose `embeds` [tokens, hidden_size]
are the rows of transformers' `cross_attention_states` for that image's real tiles,
i.e. the vision tower's output after `multi_modal_projector` (tile t, patch p at row
t * num_patches + p, num_patches = (image_size // patch_size) ** 2 + 1, padded tiles
left out): so `vision_dim` = hidden_size.

Supported layout (the engine refuses others): one image per request and the prompt's
first token is `<|image|>` (`image_token_index`, an embedding row past vocab_size), as
the processor builds for a prompt starting with "<|image|>". Then every text row
attends to the image, as our cross layers compute. Left out: text before the image
(chat templates put BOS and a header first; transformers gives those rows attention
over every tile, padded ones included, and drops their MLP branch) and several images
(transformers lets image i's token row see only images 0..i). A request without images
skips the cross layers, as transformers does without `cross_attention_states`.

Tensor names: transformers' `save_pretrained` default (the published checkpoints'
format): `language_model.model.*`, `language_model.lm_head.weight`, `vision_model.*`,
`multi_modal_projector.*`; not the in-memory names `save_original_format=False` writes.
"""

from __future__ import annotations

import numpy as np

from models.config import CROSS, FULL, DecoderConfig
from models.hf.common import (
    CheckpointError,
    Target,
    Targets,
    linear,
    lm_head,
    param,
    refuse_unless,
    rope_config,
)

ARCHITECTURES = ("MllamaForConditionalGeneration",)
IGNORED = (r"^vision_model\.", r"^multi_modal_projector\.")
EXTRA_EMBED_ROWS = 8  # MllamaTextModel: nn.Embedding(vocab_size + 8, hidden_size)
PREFIX = "language_model.model."


def decoder_config(hf: dict, dtype: str) -> DecoderConfig:
    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise CheckpointError("MllamaForConditionalGeneration: config.json has no text_config")
    refuse_unless(text, hidden_act="silu")
    layers, hidden = text["num_hidden_layers"], text["hidden_size"]
    cross = sorted(set(text["cross_attention_layers"]))
    if not all(isinstance(i, int) and 0 <= i < layers for i in cross):
        raise CheckpointError(
            f"cross_attention_layers {text['cross_attention_layers']} out of [0, {layers})"
        )
    vocab, heads = text["vocab_size"], text["num_attention_heads"]
    image_token = hf.get("image_token_index", 128256)
    rows = vocab + EXTRA_EMBED_ROWS
    if not 0 <= image_token < rows:
        raise CheckpointError(f"image_token_index {image_token} is not an embedding row (< {rows})")
    return DecoderConfig(
        name=hf.get("_name_or_path") or hf.get("model_type", "mllama"),
        layer_types=tuple(CROSS if i in cross else FULL for i in range(layers)),
        vocab_size=vocab,
        embed_rows=rows,
        image_token_id=image_token,
        d_model=hidden,
        num_heads=heads,
        num_kv_heads=text.get("num_key_value_heads") or heads,
        head_dim=hidden // heads,  # as MllamaTextSelfAttention (config.head_dim is unused)
        mlp_dim=text["intermediate_size"],
        rope=rope_config(text),
        vision_dim=hidden,  # images come projected to the text width
        tie_embeddings=False,  # the LM head is its own tensor (never tied in transformers)
        norm_eps=text.get("rms_norm_eps", 1e-5),
        max_seq_len=text.get("max_position_embeddings", 131_072),
        dtype=dtype,
    )


def _gate(tensor: np.ndarray) -> np.ndarray:
    """A tanh gate stored as [1] -> our scalar (other shapes fail the loader's check)."""
    return tensor.reshape(()) if tensor.shape == (1,) else tensor


def tensor_targets(cfg: DecoderConfig, hf: dict) -> Targets:
    names: Targets = {
        f"{PREFIX}embed_tokens.weight": param(("embed",)),  # [vocab + 8, hidden]
        f"{PREFIX}norm.weight": param(("final_norm", "weight")),
        "language_model.lm_head.weight": lm_head(),  # [vocab, hidden]
    }
    for i, kind in enumerate(cfg.layer_types):
        src, ours = f"{PREFIX}layers.{i}.", ("blocks", i)
        attn = "cross_attn" if kind is CROSS else "self_attn"
        for p in ("q", "k", "v", "o"):
            names[f"{src}{attn}.{p}_proj.weight"] = linear((*ours, "mixer", f"{p}_proj"))
        if kind is CROSS:
            for p in ("q_norm", "k_norm"):
                names[f"{src}cross_attn.{p}.weight"] = param((*ours, "mixer", p, "weight"))
            for hf_gate, gate in (("attn", "attn_gate"), ("mlp", "mlp_gate")):
                names[f"{src}cross_attn_{hf_gate}_gate"] = [Target((*ours, gate), _gate)]
        for p in ("gate", "up", "down"):
            names[f"{src}mlp.{p}_proj.weight"] = linear((*ours, "mlp", p))
        names[f"{src}input_layernorm.weight"] = param((*ours, "pre_norm", "weight"))
        names[f"{src}post_attention_layernorm.weight"] = param((*ours, "pre_mlp_norm", "weight"))
    return names
