"""Layer kinds as data: what one layer must keep per request, and its size in bytes."""

from __future__ import annotations

import dataclasses
import enum

from jenga_jax.core.errors import LayoutError

# Bytes per element of the storage dtypes a KV cache or a state may use.
DTYPE_BYTES: dict[str, int] = {
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
}


class AttentionType(enum.Enum):
    """How a layer's memory grows with the request."""

    FULL = "full"  # K,V for every token
    SLIDING = "sliding"  # K,V for the last `window` tokens
    CHUNKED = "chunked"  # K,V for the tokens of the current chunk of `chunk` tokens
    CROSS = "cross"  # K,V for the request's encoder/image tokens, fixed per request
    STATE = "state"  # one fixed-size state per request (Mamba, linear attention)


FULL, SLIDING, CHUNKED, CROSS, STATE = AttentionType  # short names, in declaration order
TOKEN_TYPES = (FULL, SLIDING, CHUNKED)


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """One kind of layer. Two layers of the same kind store identical page shapes.

    Attention kinds carry `num_kv_heads`, `head_dim` and `dtype`; a state kind carries
    `state_bytes` (per layer). `tag` separates kinds that are otherwise equal but live
    in different models (a draft model beside its target).
    """

    type: AttentionType
    num_kv_heads: int = 0
    head_dim: int = 0
    dtype: str = "bfloat16"
    window: int | None = None  # SLIDING: a token attends to itself and window-1 before it
    chunk: int | None = None  # CHUNKED: a token attends to its chunk's earlier tokens
    state_bytes: int = 0  # STATE: bytes of one layer's state for one request
    checkpoint_interval: int | None = None  # STATE: save a state every N tokens
    tag: str = ""

    def __post_init__(self):
        if not isinstance(self.type, AttentionType):
            raise LayoutError(f"layer kind type must be an AttentionType, got {self.type!r}")
        if self.dtype not in DTYPE_BYTES:
            raise LayoutError(f"unknown dtype {self.dtype!r}; known: {sorted(DTYPE_BYTES)}")
        if self.type is AttentionType.STATE:
            if self.state_bytes <= 0:
                raise LayoutError(f"state kind needs state_bytes > 0, got {self.state_bytes}")
            if self.checkpoint_interval is not None and self.checkpoint_interval <= 0:
                raise LayoutError(
                    f"checkpoint_interval must be positive or None, got {self.checkpoint_interval}"
                )
        else:
            if self.num_kv_heads <= 0 or self.head_dim <= 0:
                raise LayoutError(
                    f"{self.type.value} kind needs num_kv_heads > 0 and head_dim > 0, "
                    f"got {self.num_kv_heads} and {self.head_dim}"
                )
        if self.type is AttentionType.SLIDING and (self.window is None or self.window <= 0):
            raise LayoutError(f"sliding kind needs window > 0, got {self.window}")
        if self.type is AttentionType.CHUNKED and (self.chunk is None or self.chunk <= 0):
            raise LayoutError(f"chunked kind needs chunk > 0, got {self.chunk}")
        if self.type is not AttentionType.SLIDING and self.window is not None:
            raise LayoutError(f"window is only for sliding kinds, got it on {self.type.value}")
        if self.type is not AttentionType.CHUNKED and self.chunk is not None:
            raise LayoutError(f"chunk is only for chunked kinds, got it on {self.type.value}")

    @property
    def is_token_kind(self) -> bool:
        """True for kinds whose memory grows with the request's own tokens."""
        return self.type in TOKEN_TYPES

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def bytes_per_token(self) -> int:
        """K and V bytes of one token in one layer (0 for a state kind)."""
        if self.type is AttentionType.STATE:
            return 0
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def name(self) -> str:
        """Short readable name, unique among distinct kinds of one layout."""
        if self.type is AttentionType.STATE:
            core = f"state{self.state_bytes}B"
        else:
            core = f"{self.type.value}"
            if self.window is not None:
                core += f"{self.window}"
            if self.chunk is not None:
                core += f"{self.chunk}"
            core += f"-{self.num_kv_heads}x{self.head_dim}-{self.dtype}"
        return f"{self.tag}:{core}" if self.tag else core

    def first_needed_token(self, num_computed: int) -> int:
        """First token whose K/V a query at position `num_computed` or later still reads."""
        if self.type is AttentionType.SLIDING:
            return max(0, num_computed - self.window + 1)
        if self.type is AttentionType.CHUNKED:
            return (num_computed // self.chunk) * self.chunk
        return 0


def full(num_kv_heads: int, head_dim: int, dtype: str = "bfloat16", tag: str = "") -> LayerKind:
    return LayerKind(AttentionType.FULL, num_kv_heads, head_dim, dtype, tag=tag)


def sliding(
    window: int, num_kv_heads: int, head_dim: int, dtype: str = "bfloat16", tag: str = ""
) -> LayerKind:
    return LayerKind(AttentionType.SLIDING, num_kv_heads, head_dim, dtype, window=window, tag=tag)


def chunked(
    chunk: int, num_kv_heads: int, head_dim: int, dtype: str = "bfloat16", tag: str = ""
) -> LayerKind:
    return LayerKind(AttentionType.CHUNKED, num_kv_heads, head_dim, dtype, chunk=chunk, tag=tag)


def cross(num_kv_heads: int, head_dim: int, dtype: str = "bfloat16", tag: str = "") -> LayerKind:
    return LayerKind(AttentionType.CROSS, num_kv_heads, head_dim, dtype, tag=tag)


def state(
    state_bytes: int,
    checkpoint_interval: int | None = None,
    dtype: str = "bfloat16",
    tag: str = "",
) -> LayerKind:
    return LayerKind(
        AttentionType.STATE,
        dtype=dtype,
        state_bytes=state_bytes,
        checkpoint_interval=checkpoint_interval,
        tag=tag,
    )
