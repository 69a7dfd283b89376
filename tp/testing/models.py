"""Tiny models built from a family's config, for verification and dry runs."""

from __future__ import annotations

import os

from torch import nn

from ..infer.tiny import build
from ..plan.registry import load_registry


def registered_family(name: str | None, registry: str | os.PathLike | None = None) -> str | None:
    """``name`` if the registry has such a family; None for a bare transformers model type."""
    return name if name in load_registry(registry).families else None


def family_config(name: str, *, tiny: bool = True, registry: str | os.PathLike | None = None, **overrides):
    """The HF config of a registry family, or of any transformers model type (whose plan will be
    inferred): tiny sizes from the registry, or the library's defaults (full size)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    reg = load_registry(registry)
    if registered_family(name, registry):
        model_type = _family_model_type(reg, name)
        family_sizes = {k: v for a in reg.lineage(name) for k, v in reg.families[a].tiny.items()}
    elif name in CONFIG_MAPPING_NAMES:
        model_type, family_sizes = name, {}
    else:
        reg.get(name)  # raises, naming the known families
    sizes = {**_known_keys(model_type, reg.tiny), **family_sizes} if tiny else {}
    return AutoConfig.for_model(model_type, **{**sizes, **overrides})


def _family_model_type(reg, name: str) -> str:
    """The config type of a family's tiny model: its first model_type, else the config type of a
    transformers class it names (t5, bart and whisper are recognised by their encoder-decoder
    classes only, so that their decoder-only ``...ForCausalLM`` keep the inferred plan)."""
    if not reg.inherited(name, "model_types"):
        import transformers

        for cls in reg.inherited(name, "classes"):
            config_class = getattr(getattr(transformers, cls, None), "config_class", None)
            if getattr(config_class, "model_type", None):
                return config_class.model_type
    return reg.model_type(name)  # raises when there is none


def _known_keys(model_type: str, sizes: dict) -> dict:
    """The shared tiny sizes this config type has: a key it does not know (``head_dim`` for GPT-2)
    would only be stored, and then misread as the model's head size."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    known = set(default.to_dict()) | set(getattr(default, "attribute_map", {}))
    return {k: v for k, v in sizes.items() if k in known}


def tiny_model(family: str, *, registry: str | os.PathLike | None = None, seed: int = 0, **overrides) -> nn.Module:
    """The tiny model of a family; a registered family with an encoder-decoder config (t5, bart,
    whisper) is built whole, encoder and decoder, not as its decoder-only causal LM."""
    config = family_config(family, registry=registry, **overrides)
    return build(config, seed=seed, encoder_decoder=encoder_decoder(config, registered_family(family, registry)))


def encoder_decoder(config, family: str | None) -> bool | None:
    """True for a registered family's encoder-decoder config (build it whole), else None (the
    Auto classes decide)."""
    return True if family and getattr(config, "is_encoder_decoder", False) else None
