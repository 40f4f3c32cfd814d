"""Which family module reads which `architectures` entry of config.json.

A family module has `ARCHITECTURES`, `decoder_config(hf, dtype)` and
`tensor_targets(cfg, hf)`; optionally `IGNORED`, regexes of checkpoint tensors it
does not use (say, a vision tower whose features are given precomputed).
"""

from __future__ import annotations

import types

from models.config import DecoderConfig
from models.hf import gemma, gpt_oss, jamba, llama, llama4, mistral, mllama
from models.hf.common import CheckpointError, architecture

FAMILIES: tuple[types.ModuleType, ...] = (llama, jamba, gpt_oss, mistral, gemma, llama4, mllama)


def supported_architectures() -> tuple[str, ...]:
    return tuple(a for family in FAMILIES for a in family.ARCHITECTURES)


def family_of(hf: dict) -> types.ModuleType:
    """The family module for this config.json (CheckpointError if none)."""
    arch = architecture(hf)
    for family in FAMILIES:
        if arch in family.ARCHITECTURES:
            return family
    raise CheckpointError(
        f"architecture {arch!r} is not supported; supported: {supported_architectures()}"
    )


def decoder_config(hf: dict, dtype: str = "float32") -> DecoderConfig:
    """The DecoderConfig of a config.json: the model and its memory layout
    (`decoder_config(hf).layout()`) come from this one source."""
    family = family_of(hf)
    try:
        return family.decoder_config(hf, dtype)
    except KeyError as e:
        raise CheckpointError(f"{architecture(hf)}: config.json has no {e.args[0]!r}") from e
    except CheckpointError:
        raise
    except (ValueError, TypeError) as e:  # the config classes' own checks
        raise CheckpointError(f"{architecture(hf)}: config.json is not usable: {e}") from e
