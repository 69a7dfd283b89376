"""Tiny models built from a family's config, for verification and dry runs."""

from __future__ import annotations

import os

import torch
from torch import nn

from . import modeling_yuan  # noqa: F401  (registers model_type "yuan" with the Auto classes)
from .registry import load_registry


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
        model_type = reg.model_type(name)
        family_sizes = {k: v for a in reg.lineage(name) for k, v in reg.families[a].tiny.items()}
    elif name in CONFIG_MAPPING_NAMES:
        model_type, family_sizes = name, {}
    else:
        reg.get(name)  # raises, naming the known families
    sizes = {**_known_keys(model_type, reg.tiny), **family_sizes} if tiny else {}
    return AutoConfig.for_model(model_type, **{**sizes, **overrides})


def _known_keys(model_type: str, sizes: dict) -> dict:
    """The shared tiny sizes this config type has: a key it does not know (``head_dim`` for GPT-2)
    would only be stored, and then misread as the model's head size."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    known = set(default.to_dict()) | set(getattr(default, "attribute_map", {}))
    return {k: v for k, v in sizes.items() if k in known}


def build(config, *, device: str | torch.device = "cpu", seed: int = 0) -> nn.Module:
    """A randomly initialised float32 causal LM; on the meta device no memory is used."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def tiny_model(family: str, *, registry: str | os.PathLike | None = None, seed: int = 0, **overrides) -> nn.Module:
    return build(family_config(family, registry=registry, **overrides), seed=seed)
