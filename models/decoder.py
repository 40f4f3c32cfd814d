"""The hybrid decoder: embeddings, a per-layer kind pattern of blocks, the LM head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jenga_jax.device.layer_cache import DenseCache
from models.config import CROSS, DecoderConfig
from models.layers import Block, make_norm

_HIGHEST = jax.lax.Precision.HIGHEST


class HybridDecoder(nnx.Module):
    """A decoder whose layer i is of kind ``cfg.layer_types[i]``.

    ``__call__`` runs any cache (paged or dense) and returns hidden states; ``logits``
    applies the head; ``forward_dense`` is the no-cache oracle over whole sequences.
    """

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Param(
            jax.random.normal(rngs.params(), (cfg.num_embeddings, cfg.d_model), cfg.dtype)
        )
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
        self.final_norm = make_norm(cfg)
        if cfg.tie_embeddings:
            self.lm_head = None
        else:
            scale = cfg.d_model**-0.5
            self.lm_head = nnx.Param(
                jax.random.normal(rngs.params(), (cfg.d_model, cfg.vocab_size), cfg.dtype) * scale
            )

    def __call__(self, token_ids, positions, cache):
        """token_ids, positions int [B, T] -> (cache, hidden [B, T, d_model])."""
        x = self.embed[...][token_ids]  # [B, T, d_model]
        if self.cfg.embed_scale:
            x = x * jnp.asarray(self.cfg.d_model**0.5, x.dtype)
        for block in self.blocks:
            cache, x = block(x, positions, cache)
        return cache, self.final_norm(x)

    def logits(self, hidden):
        """hidden [..., d_model] -> float32 logits [..., vocab] (Gemma-2 final soft-cap)."""
        if self.lm_head is None:
            head = self.embed[...][: self.cfg.vocab_size].T  # [d_model, vocab]
        else:
            head = self.lm_head[...]
        out = jnp.einsum("...d,dv->...v", hidden, head, precision=_HIGHEST).astype(jnp.float32)
        cap = self.cfg.final_soft_cap
        return out if cap is None else cap * jnp.tanh(out / cap)

    def forward_dense(self, token_ids, image_embeds=None, image_lens=None):
        """The oracle: logits [B, T, vocab] of whole sequences, no cache, no pages.

        token_ids int [B, T] at positions 0..T-1; image_embeds [B, E, vision_dim] and
        image_lens int [B] (real image tokens per row) for models with cross layers.
        """
        token_ids = jnp.asarray(token_ids)
        b, t = token_ids.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if CROSS in self.cfg.layer_types:
            if image_embeds is None:
                image_embeds = jnp.zeros((b, 0, self.cfg.vision_dim), self.cfg.dtype)
            if image_lens is None:
                image_lens = jnp.full((b,), image_embeds.shape[1], jnp.int32)
        cache = DenseCache(positions, image_embeds, image_lens)
        _, hidden = self(token_ids, positions, cache)
        return self.logits(hidden)
