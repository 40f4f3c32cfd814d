"""A model's layout: the kind of every layer, with identical kinds grouped."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

from jenga_jax.core.errors import LayoutError
from jenga_jax.core.layer_kinds import AttentionType, LayerKind


@dataclasses.dataclass(frozen=True)
class KindGroup:
    """All layers of one kind: they share one page (page -> layer layout)."""

    kind: LayerKind
    layer_indices: tuple[int, ...]

    @property
    def num_layers(self) -> int:
        return len(self.layer_indices)

    @property
    def bytes_per_token(self) -> int:
        """K/V bytes of one token over all layers of the group."""
        return self.kind.bytes_per_token * self.num_layers

    @property
    def state_bytes(self) -> int:
        """State bytes of one request over all layers of the group."""
        return self.kind.state_bytes * self.num_layers


@dataclasses.dataclass(frozen=True)
class ModelLayout:
    """Maps every layer of a model (or of several, e.g. draft + target) to its kind."""

    name: str
    layers: tuple[LayerKind, ...]

    def __post_init__(self):
        if not self.layers:
            raise LayoutError(f"layout {self.name!r} has no layers")
        for i, kind in enumerate(self.layers):
            if not isinstance(kind, LayerKind):
                raise LayoutError(f"layer {i} of {self.name!r} is not a LayerKind: {kind!r}")
        object.__setattr__(self, "layers", tuple(self.layers))

    @classmethod
    def from_kinds(cls, name: str, layers: Sequence[LayerKind]) -> ModelLayout:
        return cls(name, tuple(layers))

    @functools.cached_property
    def groups(self) -> tuple[KindGroup, ...]:
        """Distinct kinds in order of first appearance, each with its layers."""
        order: dict[LayerKind, list[int]] = {}
        for i, kind in enumerate(self.layers):
            order.setdefault(kind, []).append(i)
        return tuple(KindGroup(k, tuple(idx)) for k, idx in order.items())

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def has(self, attention_type: AttentionType) -> bool:
        return any(k.type is attention_type for k in self.layers)

    def concat(self, other: ModelLayout, name: str | None = None) -> ModelLayout:
        """Both models in one pool (speculative decoding: target + draft).

        Tag the other's kinds first if they could equal this layout's kinds but must
        not share pages (`other.tagged("draft")`).
        """
        return ModelLayout(name or f"{self.name}+{other.name}", self.layers + other.layers)

    def tagged(self, tag: str) -> ModelLayout:
        """The same layout with every kind tagged, so it never shares pages with another."""
        return ModelLayout(
            f"{tag}:{self.name}", tuple(dataclasses.replace(k, tag=tag) for k in self.layers)
        )

    def describe(self) -> str:
        parts = [f"{g.num_layers}x {g.kind.name}" for g in self.groups]
        return f"{self.name}: " + ", ".join(parts)
