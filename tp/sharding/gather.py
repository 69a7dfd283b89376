"""Full tensors back from a sharded model: DTensors, and plain tensors that hold a layout's rows."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from .tags import LocalShard, is_packed, layouts_by_name, local_shard_of


def full_tensor(tensor: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """The whole tensor on every rank (a collective for sharded tensors: call it on every rank).

    ``like`` is the parameter whose layout ``tensor`` follows, e.g. for its gradient. It reads the
    parameter's own tag, which ``model.to()`` drops; ``full_state_dict`` reads the model's modules.
    """
    shard = local_shard_of(like if like is not None else tensor)
    if shard is not None:  # the layout's rows, whichever tensor holds them
        return _gathered(tensor, shard)
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model``, whole, under its usual name (on every rank).

    Under FSDP2 + TP the FSDP units are unsharded first, so that each parameter is gathered over the
    TP mesh alone, as tp sharded it; ``DTensor.full_tensor()`` of the 2-D parameter is wrong in
    torch 2.13 where FSDP nests a ``_StridedShard`` under tp's on the same dimension."""
    packed = {name: shard for name, shard in layouts_by_name(model).items() if is_packed(shard)}
    state = model.state_dict()  # before unsharding: FSDP2's state-dict hook puts the sharded parameters back
    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in fsdp:
        unit.unshard()
    try:
        unsharded = {**state, **dict(model.named_parameters(remove_duplicate=False))}
        full = {name: _gathered(unsharded[name].detach(), packed[name]) if name in packed
                else full_tensor(unsharded[name].detach()) for name in state}
        # a parameter FSDP holds unsharded may be its all-gather buffer itself, freed by reshard()
        return {name: value.clone() for name, value in full.items()} if fsdp else full
    finally:
        for unit in fsdp:
            unit.reshard()


def _gathered(tensor: torch.Tensor, shard: LocalShard) -> torch.Tensor:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return shard.layout.gather(local, shard.dim, group=shard.mesh.get_group())
