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
        sizes, model_type = reg.tiny_config(name), reg.model_type(name)
    elif name in CONFIG_MAPPING_NAMES:
        sizes, model_type = dict(reg.tiny), name
    else:
        reg.get(name)  # raises, naming the known families
    return AutoConfig.for_model(model_type, **{**(sizes if tiny else {}), **overrides})


def build(config, *, device: str | torch.device = "cpu", seed: int = 0) -> nn.Module:
    """A randomly initialised float32 causal LM; on the meta device no memory is used."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def tiny_model(family: str, *, registry: str | os.PathLike | None = None, seed: int = 0, **overrides) -> nn.Module:
    return build(family_config(family, registry=registry, **overrides), seed=seed)
