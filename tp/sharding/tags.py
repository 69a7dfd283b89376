"""The one owner of the tags a sharded parameter carries.

A parameter whose rows a DTensor placement describes is a DTensor; it is tagged with its
``LocalShard`` too (``_tp_layout``), so checkpoints can reshard its parts. A parameter no
placement describes (unequal fused parts, kv heads replicated by need) is a plain tensor of this
rank's rows, tagged ``_tp_local_shard``. A module whose parameters hold replicated rows keeps
their ``LocalShard`` on itself, since FSDP2 replaces the Parameter objects (and their tags).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor

from .layouts import Layout

_LOCAL = "_tp_local_shard"
_PLACED = "_tp_layout"
_REPLICATED = "_tp_replicated_rows"


@dataclass(frozen=True)
class LocalShard:
    """Marks a parameter that holds only this rank's rows of ``layout`` along ``dim``."""

    layout: Layout
    dim: int
    mesh: DeviceMesh


def local_shard_parameter(local: torch.Tensor, shard: LocalShard, *, requires_grad: bool = True) -> nn.Parameter:
    """A plain parameter holding this rank's rows of ``shard.layout``, tagged for gathering."""
    param = nn.Parameter(local, requires_grad=requires_grad)
    setattr(param, _LOCAL, shard)
    return param


def place_parameter(module: nn.Module, name: str, layout: Layout, dim: int, mesh: DeviceMesh) -> None:
    """Replace ``module.name`` by its shard: a DTensor where a placement describes ``layout``,
    else a tagged plain tensor of this rank's rows. Rows replicated over ranks are remembered
    on the module (``replicated_rows``)."""
    param = getattr(module, name)
    tp, rank = mesh.size(), mesh.get_local_rank()
    shard = LocalShard(layout, dim, mesh)
    placement = layout.placement(dim, tp)
    if placement is not None:
        placed = nn.Parameter(distribute_tensor(param.detach(), mesh, [placement], src_data_rank=None),
                              requires_grad=param.requires_grad)
        setattr(placed, _PLACED, shard)
    else:
        placed = local_shard_parameter(layout.shard(param.detach(), dim, tp, rank), shard,
                                       requires_grad=param.requires_grad)
    module.register_parameter(name, placed)
    if layout.replicated_rows(tp, rank):
        module.__dict__.setdefault(_REPLICATED, {})[name] = shard


def replicated_rows(module: nn.Module) -> dict[str, LocalShard]:
    """Parameter name -> LocalShard of the module's parameters that hold rows replicated over ranks."""
    return module.__dict__.get(_REPLICATED, {})


def local_shard_of(param: torch.Tensor) -> LocalShard | None:
    """The tag of a plain parameter that holds only this rank's rows, else None."""
    return getattr(param, _LOCAL, None)


def layout_of(param: torch.Tensor) -> LocalShard | None:
    """The layout a parameter was sharded with, a DTensor's as well as a plain local shard's."""
    return local_shard_of(param) or getattr(param, _PLACED, None)


def copy_tags(source: torch.Tensor, target: torch.Tensor) -> None:
    """Give ``target`` (a parameter replacing ``source``) the same tags."""
    for tag in (_LOCAL, _PLACED):
        if hasattr(source, tag):
            setattr(target, tag, getattr(source, tag))


def is_sharded(param: torch.Tensor) -> bool:
    return isinstance(param, DTensor) or local_shard_of(param) is not None
