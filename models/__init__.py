"""Flax NNX hybrid decoders over the shared paged KV pool."""

from models.config import DecoderConfig, MambaConfig, MoEConfig, RopeConfig
from models.decoder import HybridDecoder
from models.families import FAMILIES, tiny_config

__all__ = [
    "FAMILIES",
    "DecoderConfig",
    "HybridDecoder",
    "MambaConfig",
    "MoEConfig",
    "RopeConfig",
    "tiny_config",
]
