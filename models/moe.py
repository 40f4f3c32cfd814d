"""Mixture-of-experts MLP: a router picks `top_k` experts per token; grouped matmuls.

Tokens are sorted by expert and each expert's rows multiply its own weights in one
`jax.lax.ragged_dot` (no [tokens, experts] dense compute, no per-expert loop).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import DecoderConfig, MoEConfig
from models.linear import Dense, normal_init

_HIGHEST = jax.lax.Precision.HIGHEST


def route(logits, moe: MoEConfig):
    """logits float32 [N, E] -> (weights float32 [N, k], experts int32 [N, k])."""
    if moe.router == "topk_softmax":  # gpt-oss: softmax over the chosen logits
        top, experts = jax.lax.top_k(logits, moe.top_k)
        return jax.nn.softmax(top, axis=-1), experts
    if moe.router == "topk_sigmoid":  # Llama-4: sigmoid of each chosen logit
        top, experts = jax.lax.top_k(logits, moe.top_k)
        return jax.nn.sigmoid(top), experts
    weights, experts = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), moe.top_k)
    if moe.renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts


def activate(gate, up, moe: MoEConfig):
    """gate, up [..., f] -> [..., f]."""
    if moe.activation == "silu":
        return jax.nn.silu(gate) * up
    limit = moe.swiglu_limit  # gpt-oss: clamped gate, clamped and shifted up
    gate = jnp.minimum(gate, limit)
    up = jnp.clip(up, -limit, limit)
    return (up + 1) * gate * jax.nn.sigmoid(gate * moe.swiglu_alpha)


class MoE(nnx.Module):
    """Routed experts: sum over the top k of weight * down(act(gate x, up x)) (or of
    down(act(gate wx, up wx)) with `weight_input`), plus the shared expert if any."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        m, d, dt = cfg.moe, cfg.d_model, cfg.dtype
        e, f = m.num_experts, m.expert_dim
        self.moe = m
        self.router = Dense(d, e, bias=m.router_bias, dtype=dt, rngs=rngs)
        self.gate = nnx.Param(normal_init(rngs, (e, d, f), d, dt))
        self.up = nnx.Param(normal_init(rngs, (e, d, f), d, dt))
        self.down = nnx.Param(normal_init(rngs, (e, f, d), f, dt))
        bias = lambda n: nnx.Param(jnp.zeros((e, n), dt)) if m.expert_bias else None  # noqa: E731
        self.gate_bias, self.up_bias, self.down_bias = bias(f), bias(f), bias(d)
        s, kw = m.shared_dim, dict(bias=False, dtype=dt, rngs=rngs)  # the shared expert
        self.shared_gate = Dense(d, s, **kw) if s else None
        self.shared_up = Dense(d, s, **kw) if s else None
        self.shared_down = Dense(s, d, **kw) if s else None

    def __call__(self, x):
        """x [..., d_model] -> [..., d_model]."""
        m = self.moe
        flat_x = x.reshape(-1, x.shape[-1])  # [N, d]
        weights, experts = route(self.router(flat_x).astype(jnp.float32), m)  # [N, k]
        flat_experts = experts.reshape(-1)  # [N*k]
        order = jnp.argsort(flat_experts, stable=True)  # rows grouped by expert
        expert_of_row = flat_experts[order]  # [N*k]
        token_of_row = order // m.top_k  # [N*k]
        sizes = jnp.bincount(flat_experts, length=m.num_experts).astype(jnp.int32)  # [E]
        rows = flat_x[token_of_row]  # [N*k, d]
        row_weight = weights.reshape(-1)[order].astype(flat_x.dtype)  # [N*k]
        if m.weight_input:  # Llama-4: the expert's input is scaled, its output is not
            rows = rows * row_weight[:, None]
            row_weight = jnp.ones_like(row_weight)

        def grouped(a, w, bias):  # a [N*k, i], w [E, i, o] -> [N*k, o]
            out = jax.lax.ragged_dot(a, w[...], sizes, precision=_HIGHEST)
            return out if bias is None else out + bias[...][expert_of_row]

        hidden = activate(grouped(rows, self.gate, self.gate_bias),
                          grouped(rows, self.up, self.up_bias), m)  # fmt: skip
        out_rows = grouped(hidden, self.down, self.down_bias)  # [N*k, d]
        out = jnp.zeros_like(flat_x).at[token_of_row].add(out_rows * row_weight[:, None])
        if self.shared_gate is not None:
            shared = activate(self.shared_gate(flat_x), self.shared_up(flat_x), m)
            out = out + self.shared_down(shared)  # [N, d]
        return out.reshape(x.shape)
