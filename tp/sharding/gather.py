"""Full tensors back from a sharded model, under the names of the unsharded one."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from .fused import joined_whole
from .tags import fused_in_parts


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for sharded tensors: call it on every rank).
    A parameter, or its gradient, is whole this way too, being a DTensor whose global view is the
    original tensor; a fused parameter's parts are joined by ``full_parameters``."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_parameters(model: nn.Module, *, grads: bool = False) -> dict[str, torch.Tensor | None]:
    """Parameter name -> the whole parameter (or its whole gradient, None where it has none) on every
    rank, under the names of the unsharded model: a fused parameter's parts are joined (a collective)."""
    out = {name: _whole(param.grad if grads else param.detach())
           for name, param in model.named_parameters()}
    for name, (parts, dim) in fused_in_parts(model).items():
        if parts[0] in out:
            values = [out[part] for part in parts]
            joined = None if any(v is None for v in values) else joined_whole(values, dim)
            out = _replaced(out, parts, name, joined)
    return out


def _whole(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else full_tensor(tensor)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model``, whole, under its usual name (on every rank): a
    fused parameter stored in parts is joined back under its own name.

    Under FSDP2 + TP the FSDP units are unsharded first, so that each parameter is gathered over the
    TP mesh alone, as tp sharded it."""
    state = model.state_dict()  # before unsharding: FSDP2's state-dict hook puts the sharded parameters back
    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in fsdp:
        unit.unshard()
    try:
        unsharded = {**state, **dict(model.named_parameters(remove_duplicate=False))}
        full = _once_per_tensor({name: unsharded[name] for name in state}, lambda t: full_tensor(t.detach()))
        for name, (parts, dim) in fused_in_parts(model).items():
            if parts[0] in full:
                full = _replaced(full, parts, name, joined_whole([full[part] for part in parts], dim))
        # a parameter FSDP holds unsharded may be its all-gather buffer itself, freed by reshard()
        return _once_per_tensor(full, torch.clone) if fsdp else full
    finally:
        for unit in fsdp:
            unit.reshard()


def _once_per_tensor(state: dict, fn) -> dict:
    """``fn`` of every value of ``state``, computed once per tensor: tied parameters (an embedding and
    its lm_head) stay one tensor, which ``save_pretrained`` writes once, as the unsharded model's."""
    done: dict[int, torch.Tensor] = {}
    for value in state.values():
        if id(value) not in done:
            done[id(value)] = fn(value)
    return {name: done[id(value)] for name, value in state.items()}


def _replaced(state: dict, parts: list[str], name: str, value) -> dict:
    """``state`` with the entries ``parts`` replaced by one entry ``name`` where the first part was."""
    out = {}
    for key, tensor in state.items():
        if key == parts[0]:
            out[name] = value
        elif key not in parts:
            out[key] = tensor
    return out
