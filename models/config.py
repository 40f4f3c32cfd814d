"""Frozen configurations of hybrid decoders: the per-layer kind pattern is data."""

from __future__ import annotations

import dataclasses

from jenga_jax.core import layer_kinds
from jenga_jax.core.layer_kinds import (
    CHUNKED,
    CROSS,
    DTYPE_BYTES,
    FULL,
    SLIDING,
    STATE,
    AttentionType,
)
from jenga_jax.core.layout import ModelLayout

ROPE_SCALINGS = (None, "linear", "llama3", "yarn")
ROUTERS = ("softmax", "topk_softmax", "topk_sigmoid")
EXPERT_ACTIVATIONS = ("silu", "clamped_swiglu")
ACTIVATIONS = ("silu", "gelu_tanh")
NORMS = ("rms", "gemma")  # gemma: scale by (1 + w)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float = 10_000.0
    scaling: str | None = None  # None, "linear", "llama3" or "yarn"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position: int = 8192  # llama3 and yarn
    beta_fast: float = 32.0  # yarn only
    beta_slow: float = 1.0  # yarn only
    truncate: bool = True  # yarn only: round the ramp's ends to whole dims
    attention_factor: float | None = None  # yarn: cos/sin scale (None: 0.1 ln(factor) + 1)
    interleaved: bool = False  # Llama-4: rotate adjacent pairs (x0, x1), not the two halves

    def __post_init__(self):
        if self.scaling not in ROPE_SCALINGS:
            raise ValueError(f"rope scaling must be one of {ROPE_SCALINGS}, got {self.scaling!r}")
        if self.theta <= 0 or self.factor <= 0:
            raise ValueError(f"rope theta and factor must be > 0, got {self.theta}, {self.factor}")
        if self.scaling == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError("llama3 rope needs high_freq_factor > low_freq_factor")


@dataclasses.dataclass(frozen=True)
class MambaConfig:
    """Mamba-1 mixer sizes (Jamba): d_inner = expand * d_model."""

    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 8
    inner_layernorms: bool = True


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """A mixture-of-experts MLP: each token goes to `top_k` of `num_experts` gated MLPs.

    router "softmax": softmax over all experts, then the top k (Jamba; Mixtral with
    `renormalize`); "topk_softmax": the top k logits, then softmax over them (gpt-oss);
    "topk_sigmoid": sigmoid of the top k logits (Llama-4, with `weight_input`: the weight
    scales the expert's input instead of its output). `shared_dim`: an always-on gated
    MLP of that width added to the routed sum (Llama-4's shared expert).
    activation "silu": down(silu(gate x) * up x); "clamped_swiglu": gpt-oss's variant.
    """

    num_experts: int
    top_k: int
    expert_dim: int
    router: str = "softmax"
    renormalize: bool = False
    router_bias: bool = False
    expert_bias: bool = False
    activation: str = "silu"
    swiglu_alpha: float = 1.702  # clamped_swiglu only
    swiglu_limit: float = 7.0  # clamped_swiglu only
    weight_input: bool = False  # Llama-4: expert(weight * x), not weight * expert(x)
    shared_dim: int | None = None  # Llama-4: width of a shared (always used) expert

    def __post_init__(self):
        if not 1 <= self.top_k <= self.num_experts or self.expert_dim < 1:
            raise ValueError(f"MoE needs 1 <= top_k <= num_experts and expert_dim >= 1: {self}")
        if self.router not in ROUTERS or self.activation not in EXPERT_ACTIVATIONS:
            raise ValueError(f"MoE router in {ROUTERS}, activation in {EXPERT_ACTIVATIONS}")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """One hybrid decoder. `layer_types[i]` is layer i's kind (STATE = a Mamba layer)."""

    name: str
    layer_types: tuple[AttentionType, ...]
    vocab_size: int = 256
    d_model: int = 64
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    mlp_dim: int = 128
    window: int | None = None  # SLIDING layers
    chunk: int | None = None  # CHUNKED layers
    rope: RopeConfig | None = RopeConfig()  # FULL layers (None: no positions, NoPE)
    local_rope: RopeConfig | None = None  # SLIDING/CHUNKED layers; None: same as `rope`
    attn_soft_cap: float | None = None  # Gemma-2
    final_soft_cap: float | None = None  # Gemma-2
    query_pre_attn_scalar: float | None = None  # scale = this ** -0.5 (default head_dim)
    sinks: bool = False  # gpt-oss: one learned sink logit per query head
    attn_bias: bool = False  # gpt-oss: biases on q, k, v, o
    qk_norm: bool = False  # Gemma-3: RMSNorm of q and k over head_dim
    rope_qk_l2_norm: bool = False  # Llama-4: weightless RMSNorm of q, k after RoPE (RoPE layers)
    nope_temperature: tuple[float, float] | None = None  # Llama-4 NoPE q: (floor, attn_scale)
    norm: str = "rms"
    sandwich_norms: bool = False  # Gemma-2/3: norms after attention and MLP too
    embed_scale: bool = False  # Gemma: embeddings times sqrt(d_model)
    activation: str = "silu"
    tie_embeddings: bool = False
    norm_eps: float = 1e-6
    mamba: MambaConfig | None = None  # STATE layers
    vision_dim: int | None = None  # CROSS layers: width of the image embeddings given
    moe: MoEConfig | None = None  # the MLP of the layers in `moe_layers`
    moe_layers: tuple[int, ...] = ()
    embed_rows: int | None = None  # embedding rows when inputs have extra ids (mllama)
    image_token_id: int | None = None  # mllama: images need the prompt to start with it
    max_seq_len: int = 4096
    dtype: str = "float32"  # parameters and activations

    def __post_init__(self):
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        types = set(self.layer_types)
        if not self.layer_types or not all(isinstance(t, AttentionType) for t in types):
            raise ValueError(f"{self.name}: layer_types must be a non-empty AttentionType tuple")
        for field, need in (("window", SLIDING), ("chunk", CHUNKED)):
            value = getattr(self, field)
            if (need in types) != (value is not None) or (value is not None and value < 1):
                raise ValueError(
                    f"{self.name}: {field} must be >= 1 iff there are {need.value} layers"
                )
        if (STATE in types) != (self.mamba is not None):
            raise ValueError(f"{self.name}: `mamba` must be set iff there are state (Mamba) layers")
        if (CROSS in types) != (self.vision_dim is not None):
            raise ValueError(f"{self.name}: `vision_dim` must be set iff there are cross layers")
        object.__setattr__(self, "moe_layers", tuple(self.moe_layers))
        if bool(self.moe_layers) != (self.moe is not None) or not all(
            0 <= i < len(self.layer_types) for i in self.moe_layers
        ):
            raise ValueError(f"{self.name}: `moe` must be set iff moe_layers (valid indices) are")
        if self.embed_rows is not None and self.embed_rows < self.vocab_size:
            raise ValueError(f"{self.name}: embed_rows must be >= vocab_size")
        if self.image_token_id is not None and not 0 <= self.image_token_id < self.num_embeddings:
            raise ValueError(f"{self.name}: image_token_id must be an embedding row")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.name}: num_heads must be a multiple of num_kv_heads")
        if self.norm not in NORMS or self.activation not in ACTIVATIONS:
            raise ValueError(f"{self.name}: norm in {NORMS}, activation in {ACTIVATIONS}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"{self.name}: unknown dtype {self.dtype!r}")

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    @property
    def scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def num_embeddings(self) -> int:
        return self.embed_rows or self.vocab_size

    @property
    def d_inner(self) -> int:
        return self.mamba.expand * self.d_model if self.mamba else 0

    def rope_for(self, layer_type: AttentionType) -> RopeConfig | None:
        if layer_type in (SLIDING, CHUNKED) and self.local_rope is not None:
            return self.local_rope
        return self.rope

    def state_layer_elems(self) -> int:
        """Elements of one Mamba layer's state: conv [d_conv-1, d_inner], ssm [d_inner, d_state]."""
        m = self.mamba
        return (m.d_conv - 1) * self.d_inner + self.d_inner * m.d_state

    def layout(self, kv_dtype: str = "float32", checkpoint_interval: int | None = None):
        """The host layout of this model's KV (and state) storage, all in `kv_dtype`."""
        kinds = []
        for t in self.layer_types:
            if t is STATE:
                nbytes = self.state_layer_elems() * DTYPE_BYTES[kv_dtype]
                kinds.append(layer_kinds.state(nbytes, checkpoint_interval, kv_dtype))
                continue
            heads, dim = self.num_kv_heads, self.head_dim
            if t is FULL:
                kinds.append(layer_kinds.full(heads, dim, kv_dtype))
            elif t is SLIDING:
                kinds.append(layer_kinds.sliding(self.window, heads, dim, kv_dtype))
            elif t is CHUNKED:
                kinds.append(layer_kinds.chunked(self.chunk, heads, dim, kv_dtype))
            else:
                kinds.append(layer_kinds.cross(heads, dim, kv_dtype))
        return ModelLayout.from_kinds(self.name, kinds)
