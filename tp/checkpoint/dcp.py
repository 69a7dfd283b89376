"""torch.distributed.checkpoint for sharded models, resharding across TP sizes.

DCP reshards DTensors by their placements. A fused weight (``[q; k; v]``, ``[gate; up]``,
Yuan's v/o halves) is stored part by part, as ``NAME.part0``, ``NAME.part1``, ...: each part is
an evenly sharded DTensor (or, for kv heads replicated over ranks, a replicated one), so the
checkpoint does not depend on the TP size it was written at. Everything else is stored under
its own name as the model holds it.

Example::
    >>> tp.dcp.save(model, "ckpt")        # at TP=2
    >>> tp.dcp.load(other_model, "ckpt")  # at TP=4, or TP=1 (a 1-rank mesh)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..sharding.layouts import Layout
from ..sharding.tags import LocalShard, layout_of


@dataclass
class _Split:
    """One parameter stored part by part: the local pieces DCP reads into, and how to put them back."""

    param: torch.Tensor
    shard: LocalShard
    parts: list[DTensor]


def _local_pieces(local: torch.Tensor, shard: LocalShard) -> list[torch.Tensor]:
    tp, rank = shard.mesh.size(), shard.mesh.get_local_rank()
    sizes = [len(p.local_units(tp, rank)) * p.unit_rows for p in shard.layout.parts]
    return list(local.split(sizes, dim=shard.dim))


def _part_dtensors(param: torch.Tensor, shard: LocalShard) -> list[DTensor]:
    local = (param.to_local() if isinstance(param, DTensor) else param).detach()
    mesh, dim, tp = shard.mesh, shard.dim, shard.mesh.size()
    parts = []
    for part, piece in zip(shard.layout.parts, _local_pieces(local, shard)):
        shape = list(local.shape)
        shape[dim] = part.rows
        if part.units >= tp:
            parts.append(DTensor.from_local(piece.contiguous(), mesh, [Shard(dim)], run_check=False,
                                            shape=torch.Size(shape), stride=torch.empty(shape, device="meta").stride()))
        else:  # kv heads held by several ranks each: the whole (small) part on every rank
            whole = Layout((part,)).gather(piece.contiguous(), dim, group=mesh.get_group())
            parts.append(DTensor.from_local(whole, mesh, [Replicate()], run_check=False))
    return parts


def state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[_Split]]:
    """The model's state for DCP, with fused parameters split into their parts."""
    state, splits = {}, []
    params = dict(model.named_parameters())
    for name, value in model.state_dict().items():
        param = params.get(name)
        shard = layout_of(param) if param is not None else None
        if shard is None:
            state[name] = value
            continue
        split = _Split(param, shard, _part_dtensors(param, shard))
        splits.append(split)
        state.update({f"{name}.part{i}": part for i, part in enumerate(split.parts)})
    return state, splits


def save(model: nn.Module, checkpoint_id: str | os.PathLike) -> None:
    """Save a sharded model with torch.distributed.checkpoint (a collective: call it on every rank)."""
    import torch.distributed.checkpoint as dcp

    state, _ = state_dict(model)
    dcp.save(state, checkpoint_id=checkpoint_id)


def load(model: nn.Module, checkpoint_id: str | os.PathLike) -> None:
    """Load a DCP checkpoint written by ``save`` at any TP size into a model sharded at any TP size."""
    import torch.distributed.checkpoint as dcp

    state, splits = state_dict(model)
    dcp.load(state, checkpoint_id=checkpoint_id)
    for split in splits:
        mesh = split.shard.mesh
        tp_rank = (mesh.size(), mesh.get_local_rank())
        pieces = []
        for part, loaded in zip(split.shard.layout.parts, split.parts):
            local = loaded.to_local()
            if part.units < tp_rank[0]:  # the whole part: keep this rank's unit
                unit = part.local_units(*tp_rank)[0]
                local = local.narrow(split.shard.dim, unit * part.unit_rows, part.unit_rows)
            pieces.append(local)
        target = split.param.to_local() if isinstance(split.param, DTensor) else split.param
        with torch.no_grad():
            target.copy_(torch.cat(pieces, dim=split.shard.dim))
    if dist.is_initialized():
        dist.barrier()
