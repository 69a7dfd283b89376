"""Full tensors back from a sharded model: DTensors, and plain tensors that hold a layout's rows."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .tags import local_shard_of


def full_tensor(tensor: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """The whole tensor on every rank (a collective for sharded tensors: call it on every rank).

    ``like`` is the parameter whose layout a plain ``tensor`` follows, e.g. for its gradient.
    """
    if isinstance(tensor, DTensor):
        return tensor.full_tensor()
    shard = local_shard_of(like if like is not None else tensor)
    if shard is None:
        return tensor
    return shard.layout.gather(tensor, shard.dim, group=shard.mesh.get_group())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model``, whole, under its usual name (on every rank)."""
    params = dict(model.named_parameters())
    return {name: full_tensor(value.detach(), like=params.get(name)) for name, value in model.state_dict().items()}
