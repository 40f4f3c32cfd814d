"""Chained hashes of token blocks: a block's hash names its whole prefix.

hash(block i) = H(hash(block i-1), token ids of block i, extra keys of block i).
Extra keys are the content hashes of images overlapping the block, the adapter name
(every block), a per-tenant salt and the request's encoder images (first block; the
chain carries them on: with cross attention every text token's K/V depends on them).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

from jenga_jax.core.request import ImageInput

ROOT = b"jenga-root"


def _digest(parent: bytes, tokens: Sequence[int], extra: tuple[str, ...]) -> bytes:
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", tokens).tobytes())
    for key in extra:
        h.update(b"\x00")
        h.update(key.encode())
    return h.digest()


class BlockHasher:
    """Hashes the full blocks of one request's tokens, incrementally as tokens arrive."""

    def __init__(
        self,
        block_size: int,
        inline_images: Sequence[ImageInput] = (),
        adapter: str | None = None,
        salt: str | None = None,
        context: Sequence[str] = (),
    ):
        self.block_size = block_size
        self.context = tuple(context)
        self.images = sorted(inline_images, key=lambda im: im.offset)
        self.adapter = adapter
        self.salt = salt
        self.hashes: list[bytes] = []

    def _extra(self, index: int) -> tuple[str, ...]:
        start, end = index * self.block_size, (index + 1) * self.block_size
        keys = [
            "img:" + im.content_hash
            for im in self.images
            if im.offset < end and im.offset + im.num_tokens > start
        ]
        if self.adapter:
            keys.append("lora:" + self.adapter)
        if index == 0 and self.salt:
            keys.append("salt:" + self.salt)
        if index == 0:
            keys.extend("enc:" + c for c in self.context)
        return tuple(keys)

    def update(self, token_ids: Sequence[int]) -> list[bytes]:
        """Hash every full block of `token_ids` not hashed yet; returns all block hashes."""
        b = self.block_size
        hashes = self.hashes
        for i in range(len(hashes), len(token_ids) // b):
            parent = hashes[-1] if hashes else ROOT
            hashes.append(_digest(parent, token_ids[i * b : (i + 1) * b], self._extra(i)))
        return hashes

    def truncate(self, num_tokens: int) -> None:
        """Forget the blocks beyond `num_tokens` tokens (tokens taken back)."""
        del self.hashes[num_tokens // self.block_size :]
