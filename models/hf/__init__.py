"""Hugging Face checkpoints: config.json -> DecoderConfig, safetensors -> parameters."""

from models.hf.common import CheckpointError, read_config
from models.hf.loader import load_hf_checkpoint
from models.hf.registry import decoder_config, family_of, supported_architectures

__all__ = [
    "CheckpointError",
    "decoder_config",
    "family_of",
    "load_hf_checkpoint",
    "read_config",
    "supported_architectures",
]
