"""The one owner of the tags a sharded parameter carries.

Every parameter of a sharded model is a DTensor on the tensor-parallel mesh, so that torch's
optimizers, gradient clipping and checkpoints take them all at once:

- rows a placement describes (one part: ``Shard``; equal fused parts: ``_StridedShard``): a
  DTensor whose global view is the original tensor, tagged with its ``LocalShard``
  (``_tp_layout``) so checkpoints can reshard its parts;
- unequal fused parts (phi3's ``qkv_proj`` with fewer kv than query heads): every rank holds as
  many distinct rows, a ``Shard(dim)`` DTensor of the rows in rank order (a permutation of the
  original), tagged ``_tp_local_shard``: the layout, not DTensor, gathers it;
- a layout that gives some rows to several ranks (kv heads replicated by need, TP > kv heads):
  the whole tensor, replicated, tagged ``_tp_layout``, so that a gradient norm counts each of its
  values once; the module computes with this rank's rows of it, and their gradients are summed;
- parameters no style shards: replicated (``tp.sharding.whole``).

A module also remembers the ``LocalShard`` of each of its parameters placed by a layout, by name:
``model.to()`` and FSDP2 replace the Parameter objects, and with them their tags.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from .layouts import Layout

_LOCAL = "_tp_local_shard"
_PLACED = "_tp_layout"
_LAYOUTS = "_tp_layouts"  # on a module: parameter name -> LocalShard, for every parameter placed by a layout


@dataclass(frozen=True)
class LocalShard:
    """Marks a parameter that holds only this rank's rows of ``layout`` along ``dim``."""

    layout: Layout
    dim: int
    mesh: DeviceMesh


def local_shard_parameter(local: torch.Tensor, shard: LocalShard, *, requires_grad: bool = True) -> nn.Parameter:
    """A parameter holding this rank's rows of ``shard.layout`` (no rank's rows repeating another's),
    tagged for gathering: a ``Shard(dim)`` DTensor of the rows concatenated in rank order."""
    shape = list(local.shape)
    shape[shard.dim] = shard.layout.size
    packed = DTensor.from_local(local, shard.mesh, [Shard(shard.dim)], run_check=False, shape=torch.Size(shape),
                                stride=torch.empty(shape, device="meta").stride())
    param = nn.Parameter(packed, requires_grad=requires_grad)
    setattr(param, _LOCAL, shard)
    return param


def replicated_parameter(param: torch.Tensor, mesh: DeviceMesh) -> nn.Parameter:
    """``param``, whole on every rank, as a replicated DTensor parameter on ``mesh``."""
    return nn.Parameter(DTensor.from_local(param.detach(), mesh, [Replicate()], run_check=False),
                        requires_grad=param.requires_grad)


def place_parameter(module: nn.Module, name: str, layout: Layout, dim: int, mesh: DeviceMesh) -> None:
    """Replace ``module.name`` by its shard: a DTensor where a placement describes ``layout``, else
    this rank's rows in rank order (``local_shard_parameter``). A layout that gives some rows to
    several ranks keeps the whole tensor, replicated, and is remembered on the module
    (``replicated_rows``): its module computes with this rank's rows of it (``rows_of_whole``)."""
    param = getattr(module, name)
    tp, rank = mesh.size(), mesh.get_local_rank()
    shard = LocalShard(layout, dim, mesh)
    placement = layout.placement(dim, tp)
    if layout.repeats_rows(tp):
        placed = replicated_parameter(param, mesh)
        setattr(placed, _PLACED, shard)
    elif placement is not None:
        placed = nn.Parameter(distribute_tensor(param.detach(), mesh, [placement], src_data_rank=None),
                              requires_grad=param.requires_grad)
        setattr(placed, _PLACED, shard)
    else:
        placed = local_shard_parameter(layout.shard(param.detach(), dim, tp, rank), shard,
                                       requires_grad=param.requires_grad)
    module.register_parameter(name, placed)
    module.__dict__.setdefault(_LAYOUTS, {})[name] = shard


def is_packed(shard: LocalShard) -> bool:
    """Whether a parameter of this layout holds its rows in rank order, a permutation of the
    original that only the layout gathers back (no placement describes it, no row repeats)."""
    tp = shard.mesh.size()
    return shard.layout.placement(shard.dim, tp) is None and not shard.layout.repeats_rows(tp)


def layouts_by_name(model: nn.Module) -> dict[str, LocalShard]:
    """Full parameter name -> LocalShard of every parameter of ``model`` placed by a layout. Read
    from the modules, so it survives what replaces the Parameter objects (``model.to()``, FSDP2)."""
    return {f"{path}.{name}" if path else name: shard for path, module in model.named_modules()
            for name, shard in module.__dict__.get(_LAYOUTS, {}).items()}


def replicated_rows(module: nn.Module) -> dict[str, LocalShard]:
    """Parameter name -> LocalShard of the module's parameters kept whole because their layout gives
    some rows to several ranks."""
    layouts = module.__dict__.get(_LAYOUTS, {})
    return {name: shard for name, shard in layouts.items() if shard.layout.repeats_rows(shard.mesh.size())}


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
