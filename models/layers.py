"""Layers of the hybrid decoder. Each mixer returns ``(new_cache, out)``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jenga_jax.device.mamba import MambaParams
from models.config import CROSS, STATE, DecoderConfig
from models.linear import Dense, normal_init
from models.moe import MoE
from models.rope import apply_rope

_HIGHEST = jax.lax.Precision.HIGHEST


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis; Gemma's variant scales by (1 + w), w starting at 0."""

    def __init__(self, dim: int, *, eps: float, gemma: bool, dtype: str):
        self.gemma = gemma
        self.eps = eps
        self.weight = nnx.Param(jnp.zeros((dim,), dtype) if gemma else jnp.ones((dim,), dtype))

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        w = self.weight[...].astype(jnp.float32)
        return (xf * (1.0 + w if self.gemma else w)).astype(x.dtype)


def make_norm(cfg: DecoderConfig, dim: int | None = None) -> RMSNorm:
    return RMSNorm(dim or cfg.d_model, eps=cfg.norm_eps, gemma=cfg.norm == "gemma", dtype=cfg.dtype)


def unit_rms(x, eps: float):
    """Llama-4's weightless "L2" norm: x / sqrt(mean(x^2) + eps) over the last axis."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def nope_temperature(positions, floor_scale: float, attn_scale: float):
    """Llama-4's query scale on NoPE layers, positions int [B, T] -> float32 [B, T, 1, 1]:
    log(1 + floor((pos + 1) / floor_scale)) * attn_scale + 1."""
    steps = jnp.floor((positions.astype(jnp.float32) + 1.0) / floor_scale)
    return (jnp.log1p(steps) * attn_scale + 1.0)[:, :, None, None]


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), SiLU (SwiGLU) or tanh-GELU (GeGLU)."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.mlp_dim
        self.gate = Dense(d, f, bias=False, dtype=cfg.dtype, rngs=rngs)
        self.up = Dense(d, f, bias=False, dtype=cfg.dtype, rngs=rngs)
        self.down = Dense(f, d, bias=False, dtype=cfg.dtype, rngs=rngs)
        self.activation = cfg.activation

    def __call__(self, x):
        g = self.gate(x)
        g = jax.nn.silu(g) if self.activation == "silu" else jax.nn.gelu(g, approximate=True)
        return self.down(g * self.up(x))


class Attention(nnx.Module):
    """Self-attention of one kind (full, sliding, chunked): GQA, RoPE, caps, sinks."""

    def __init__(self, cfg: DecoderConfig, layer: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.layer = layer
        self.kind = cfg.layer_types[layer]
        h, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(bias=cfg.attn_bias, dtype=cfg.dtype, rngs=rngs)
        self.q_proj = Dense(cfg.d_model, h * d, **kw)
        self.k_proj = Dense(cfg.d_model, hkv * d, **kw)
        self.v_proj = Dense(cfg.d_model, hkv * d, **kw)
        self.o_proj = Dense(h * d, cfg.d_model, **kw)
        self.q_norm = make_norm(cfg, d) if cfg.qk_norm else None
        self.k_norm = make_norm(cfg, d) if cfg.qk_norm else None
        self.sinks = nnx.Param(jnp.zeros((h,), cfg.dtype)) if cfg.sinks else None

    def __call__(self, x, positions, cache):
        """x [B, T, d_model]; positions int [B, T] -> (cache, [B, T, d_model])."""
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        rope = cfg.rope_for(self.kind)
        if rope is not None:
            q, k = apply_rope(q, positions, rope), apply_rope(k, positions, rope)
            if cfg.rope_qk_l2_norm:
                q, k = unit_rms(q, cfg.norm_eps), unit_rms(k, cfg.norm_eps)
        elif cfg.nope_temperature is not None:
            q = q * nope_temperature(positions, *cfg.nope_temperature).astype(q.dtype)
        cache, out = cache.attend(
            self.layer, q, k, v,
            kind=self.kind.value, window=cfg.window if self.kind.value == "sliding" else None,
            chunk=cfg.chunk if self.kind.value == "chunked" else None, scale=cfg.scale,
            soft_cap=cfg.attn_soft_cap, sinks=None if self.sinks is None else self.sinks[...],
        )  # fmt: skip
        return cache, self.o_proj(out.reshape(b, t, -1))


class CrossAttention(nnx.Module):
    """Llama-3.2-Vision cross attention: text queries over projected image embeddings."""

    def __init__(self, cfg: DecoderConfig, layer: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.layer = layer
        h, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(bias=False, dtype=cfg.dtype, rngs=rngs)
        self.q_proj = Dense(cfg.d_model, h * d, **kw)
        self.k_proj = Dense(cfg.vision_dim, hkv * d, **kw)
        self.v_proj = Dense(cfg.vision_dim, hkv * d, **kw)
        self.o_proj = Dense(h * d, cfg.d_model, **kw)
        self.q_norm = make_norm(cfg, d)
        self.k_norm = make_norm(cfg, d)

    def project(self, images):
        """images [B, E, vision_dim] -> k, v [B, E, kv_heads, head_dim]."""
        b, e, _ = images.shape
        cfg = self.cfg
        k = self.k_norm(self.k_proj(images).reshape(b, e, cfg.num_kv_heads, cfg.head_dim))
        v = self.v_proj(images).reshape(b, e, cfg.num_kv_heads, cfg.head_dim)
        return k, v

    def __call__(self, x, cache):
        """x [B, T, d_model] -> (cache, [B, T, d_model], has_image bool [B])."""
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(b, t, self.cfg.num_heads, self.cfg.head_dim))
        cache, out, has_image = cache.cross_attend(
            self.layer, q, self.project, scale=self.cfg.scale
        )
        return cache, self.o_proj(out.reshape(b, t, -1)), has_image


class Mamba(nnx.Module):
    """Jamba's Mamba-1 mixer (math in jenga_jax.device.mamba); its state in the cache."""

    def __init__(self, cfg: DecoderConfig, layer: int, *, rngs: nnx.Rngs):
        m, d, di, dt = cfg.mamba, cfg.d_model, cfg.d_inner, cfg.dtype
        self.layer = layer
        self.eps = cfg.norm_eps
        self.in_proj = nnx.Param(normal_init(rngs, (d, 2 * di), d, dt))
        self.conv_w = nnx.Param(normal_init(rngs, (di, m.d_conv), m.d_conv, dt))
        self.conv_b = nnx.Param(jnp.zeros((di,), dt))
        self.x_proj = nnx.Param(normal_init(rngs, (di, m.dt_rank + 2 * m.d_state), di, dt))
        self.dt_proj_w = nnx.Param(normal_init(rngs, (m.dt_rank, di), m.dt_rank, dt))
        self.dt_proj_b = nnx.Param(jnp.full((di,), -2.0, dt))
        a = jnp.broadcast_to(jnp.arange(1, m.d_state + 1, dtype=dt), (di, m.d_state))
        self.A_log = nnx.Param(jnp.log(a))
        self.D = nnx.Param(jnp.ones((di,), dt))
        self.out_proj = nnx.Param(normal_init(rngs, (di, d), di, dt))
        norms = m.inner_layernorms
        self.dt_norm = nnx.Param(jnp.ones((m.dt_rank,), dt)) if norms else None
        self.b_norm = nnx.Param(jnp.ones((m.d_state,), dt)) if norms else None
        self.c_norm = nnx.Param(jnp.ones((m.d_state,), dt)) if norms else None

    def params(self) -> MambaParams:
        get = lambda p: None if p is None else p[...]  # noqa: E731
        return MambaParams(
            get(self.in_proj), get(self.conv_w), get(self.conv_b), get(self.x_proj),
            get(self.dt_proj_w), get(self.dt_proj_b), get(self.A_log), get(self.D),
            get(self.out_proj), get(self.dt_norm), get(self.b_norm), get(self.c_norm), self.eps,
        )  # fmt: skip

    def __call__(self, x, cache):
        """x [B, T, d_model] -> (cache, [B, T, d_model])."""
        return cache.mamba(self.layer, self.params(), x)


class Block(nnx.Module):
    """One decoder layer: norm -> mixer (-> norm) -> residual; norm -> MLP (-> norm) -> residual.

    Cross layers gate both residual branches with tanh(gate), and leave the rows of a
    request without images unchanged (transformers' Mllama skips its cross layers when
    given no image); every row of a request with images attends to all of them.
    """

    def __init__(self, cfg: DecoderConfig, layer: int, *, rngs: nnx.Rngs):
        self.type = cfg.layer_types[layer]
        if self.type is CROSS:
            self.mixer = CrossAttention(cfg, layer, rngs=rngs)
            self.attn_gate = nnx.Param(jnp.zeros((), cfg.dtype))
            self.mlp_gate = nnx.Param(jnp.zeros((), cfg.dtype))
        elif self.type is STATE:
            self.mixer = Mamba(cfg, layer, rngs=rngs)
        else:
            self.mixer = Attention(cfg, layer, rngs=rngs)
        self.pre_norm = make_norm(cfg)
        self.post_norm = make_norm(cfg) if cfg.sandwich_norms else None
        self.pre_mlp_norm = make_norm(cfg)
        self.post_mlp_norm = make_norm(cfg) if cfg.sandwich_norms else None
        if layer in cfg.moe_layers:
            self.mlp = MoE(cfg, rngs=rngs)
        else:
            self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, cache):
        """x [B, T, d_model]; positions int [B, T] -> (cache, x)."""
        h = self.pre_norm(x)
        if self.type is CROSS:
            cache, h, has_image = self.mixer(h, cache)
            keep = has_image[:, None, None].astype(x.dtype)  # [B, 1, 1]
            attn_gate, mlp_gate = jnp.tanh(self.attn_gate[...]), jnp.tanh(self.mlp_gate[...])
        elif self.type is STATE:
            cache, h = self.mixer(h, cache)
            keep, attn_gate, mlp_gate = 1.0, 1.0, 1.0
        else:
            cache, h = self.mixer(h, positions, cache)
            keep, attn_gate, mlp_gate = 1.0, 1.0, 1.0
        if self.post_norm is not None:
            h = self.post_norm(h)
        x = x + keep * attn_gate * h
        h = self.mlp(self.pre_mlp_norm(x))
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return cache, x + keep * mlp_gate * h
