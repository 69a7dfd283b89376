"""Tiny models built from a family's config, for verification and dry runs."""

from __future__ import annotations

import os

import torch
from torch import nn

from .registry import load_registry


def family_config(family: str, *, tiny: bool = True, registry: str | os.PathLike | None = None, **overrides):
    """The family's HF config: tiny sizes from the registry, or the library's defaults (full size)."""
    from transformers import AutoConfig

    reg = load_registry(registry)
    reg.get(family)
    sizes = reg.tiny_config(family) if tiny else {}
    return AutoConfig.for_model(reg.model_type(family), **{**sizes, **overrides})


def build(config, *, device: str | torch.device = "cpu", seed: int = 0) -> nn.Module:
    """A randomly initialised float32 causal LM; on the meta device no memory is used."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    return model.eval()


def tiny_model(family: str, *, registry: str | os.PathLike | None = None, seed: int = 0, **overrides) -> nn.Module:
    return build(family_config(family, registry=registry, **overrides), seed=seed)
