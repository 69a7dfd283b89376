"""The one owner of the tags a sharded parameter carries.

Every parameter of a sharded model is a DTensor on the tensor-parallel mesh whose global view is
the original tensor, so that torch's optimizers, gradient clipping and checkpoints (DCP included,
at any TP size) take them all at once:

- rows one part describes (``Shard``): a DTensor tagged with its ``LocalShard`` (``_tp_layout``);
- a layout of several parts (fused ``qkv_proj``, packed ``gate_up_proj``): one DTensor parameter
  per part in place of the fused one (``tp.sharding.fused``), lent joined to the module's forward;
- a one-part layout that gives some rows to several ranks (kv heads replicated by need, TP > kv
  heads) or that no placement describes (heads split balanced, 2, 2, 1, 1): the whole tensor,
  replicated, so that a gradient norm counts each of its values once;
  the module computes with this rank's rows of it, and their gradients are summed;
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

from .collectives import rows_of_whole
from .fused import joined_local, part_names, split_into_parts, stored_in_parts
from .layouts import Layout
from .lending import local_of

_PLACED = "_tp_layout"
_LAYOUTS = "_tp_layouts"  # on a module: parameter name -> LocalShard, for every parameter placed by a layout


@dataclass(frozen=True)
class LocalShard:
    """Marks a parameter (or a fused one stored in parts) that holds this rank's rows of ``layout`` along ``dim``."""

    layout: Layout
    dim: int
    mesh: DeviceMesh


def replicated_parameter(param: torch.Tensor, mesh: DeviceMesh) -> nn.Parameter:
    """``param``, whole on every rank, as a replicated DTensor parameter on ``mesh``."""
    return nn.Parameter(DTensor.from_local(param.detach(), mesh, [Replicate()], run_check=False),
                        requires_grad=param.requires_grad)


def place_parameter(module: nn.Module, name: str, layout: Layout, dim: int, mesh: DeviceMesh) -> None:
    """Replace ``module.name`` by its shard: one DTensor per part for a layout of several parts
    (``tp.sharding.fused``; ``module.name`` then holds None outside the forward); a ``Shard``
    DTensor for one part; the whole tensor, replicated, for one part some of whose rows go to
    several ranks (the module computes with this rank's rows of it: ``local_rows``)."""
    param = getattr(module, name)
    shard = LocalShard(layout, dim, mesh)
    if stored_in_parts(layout):
        parts = split_into_parts(param.detach(), layout, dim, mesh)
        module.register_parameter(name, None)
        for part_name, part in zip(part_names(name, len(parts)), parts, strict=True):
            module.register_parameter(part_name, nn.Parameter(part, requires_grad=param.requires_grad))
    else:
        placed = (replicated_parameter(param, mesh) if layout.repeats_rows(mesh.size())
                  else nn.Parameter(distribute_tensor(param.detach(), mesh, [Shard(dim)], src_data_rank=None),
                                    requires_grad=param.requires_grad))
        setattr(placed, _PLACED, shard)
        module.register_parameter(name, placed)
    module.__dict__.setdefault(_LAYOUTS, {})[name] = shard


def module_layouts(module: nn.Module) -> dict[str, LocalShard]:
    """Parameter name -> LocalShard of the module's own parameters placed by a layout."""
    return module.__dict__.get(_LAYOUTS, {})


def layouts_by_name(model: nn.Module) -> dict[str, LocalShard]:
    """Full parameter name -> LocalShard of every parameter of ``model`` placed by a layout (a fused
    one under its own name, though it is stored in parts). Read from the modules, so it survives
    what replaces the Parameter objects (``model.to()``, FSDP2)."""
    return {f"{path}.{name}" if path else name: shard for path, module in model.named_modules()
            for name, shard in module_layouts(module).items()}


def stored_parts(shard: LocalShard, name: str) -> list[str]:
    """The names of the parameters that hold parameter ``name`` of this layout: its parts, or itself."""
    return part_names(name, len(shard.layout.parts)) if stored_in_parts(shard.layout) else [name]


def fused_in_parts(model: nn.Module) -> dict[str, tuple[list[str], int]]:
    """Full name of each fused parameter of ``model`` stored in parts -> (the full names of its
    parts, in order; the dimension they are joined along)."""
    out = {}
    for name, shard in layouts_by_name(model).items():
        if stored_in_parts(shard.layout):
            path, _, attr = name.rpartition(".")
            out[name] = ([f"{path}.{part}" if path else part for part in stored_parts(shard, attr)], shard.dim)
    return out


def local_rows(module: nn.Module, name: str, param: torch.Tensor | None) -> torch.Tensor | None:
    """What ``module``'s forward computes with for its parameter ``name`` (now ``param``): this rank's
    rows of it, as a plain tensor whose gradient reaches the parameter(s) that store it."""
    shard = module_layouts(module).get(name)
    if shard is not None and stored_in_parts(shard.layout):
        parts = [module._parameters[part] for part in stored_parts(shard, name)]
        return joined_local(parts, shard.layout, shard.dim, shard.mesh)
    if param is None:
        return None
    local = local_of(param)
    if shard is not None and shard.layout.repeats_rows(shard.mesh.size()):
        return rows_of_whole(local, shard.layout, shard.dim, shard.mesh)
    return local


def layout_of(param: torch.Tensor) -> LocalShard | None:
    """The layout a (one-part) parameter was sharded with."""
    return getattr(param, _PLACED, None)


def copy_tags(source: torch.Tensor, target: torch.Tensor) -> None:
    """Give ``target`` (a parameter replacing ``source``) the same tags."""
    if hasattr(source, _PLACED):
        setattr(target, _PLACED, getattr(source, _PLACED))


def computes_split(module: nn.Module) -> bool:
    """Whether ``module`` or a module inside it computes with part of a parameter: one sharded
    (a ``Shard`` DTensor) or laid out (rows of a whole-stored tensor, the parts of a fused one).
    An attention whose projections all stay whole computes with all of its heads."""
    return any(module_layouts(m) or any(isinstance(p, DTensor) and any(isinstance(pl, Shard) for pl in p.placements)
                                        for p in m.parameters(recurse=False))
               for m in module.modules())


def is_sharded(param: torch.Tensor) -> bool:
    return isinstance(param, DTensor)
