"""What the host core knows of a request: its tokens, images and cache keys."""

from __future__ import annotations

import dataclasses

from jenga_jax.core.errors import RequestError


@dataclasses.dataclass(frozen=True)
class ImageInput:
    """One image (or other media) of a request.

    With a cross-attention kind in the layout the image's `num_tokens` encoder tokens
    live in the cross-attention pages and `offset` is only informative. Without one,
    the image occupies prompt positions [offset, offset + num_tokens) (placeholder
    token ids there) and its hash becomes an extra key of every page it overlaps.
    """

    content_hash: str
    num_tokens: int
    offset: int = 0

    def __post_init__(self):
        if not isinstance(self.content_hash, str) or not self.content_hash:
            raise RequestError(
                f"image content_hash must be a non-empty str, got {self.content_hash!r}"
            )
        if self.num_tokens <= 0:
            raise RequestError(f"image num_tokens must be positive, got {self.num_tokens}")
        if self.offset < 0:
            raise RequestError(f"image offset must be >= 0, got {self.offset}")


@dataclasses.dataclass(frozen=True)
class TraceRequest:
    """One request of a workload: the prompt, the images and how many tokens to generate."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    output_len: int
    images: tuple[ImageInput, ...] = ()
    arrival: float = 0.0  # seconds (or steps) after the trace starts
    salt: str | None = None  # per-tenant cache isolation
    adapter: str | None = None  # LoRA adapter name, part of every page hash

    def __post_init__(self):
        if not self.prompt_token_ids:
            raise RequestError(f"request {self.request_id!r} has an empty prompt")
        if self.output_len <= 0:
            raise RequestError(f"request {self.request_id!r}: output_len must be positive")
        object.__setattr__(self, "prompt_token_ids", tuple(self.prompt_token_ids))
        object.__setattr__(self, "images", tuple(self.images))

    @property
    def image_tokens(self) -> int:
        return sum(im.num_tokens for im in self.images)
