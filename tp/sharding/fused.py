"""A fused weight stored as one DTensor parameter per part.

A layout with several parts (phi3's ``qkv_proj`` = ``[q; k; v]``, ``gate_up_proj`` = ``[gate; up]``)
gives each rank a slice of every part. No DTensor placement of the fused tensor describes that for
unequal parts, and torch's checkpointing refuses the one that describes equal parts
(``_StridedShard``: "overlapping chunks"). So the fused parameter ``weight`` is replaced by one
parameter per part, ``weight_part0``, ``weight_part1``, ...: each is the part's own tensor, a
``Shard(dim)`` DTensor, or ``Replicate()`` where the part has fewer units than ranks (a kv head
shared by several ranks). torch's ``get_state_dict``, DCP, optimizers, clipping and FSDP2 then see
ordinary DTensors whose global views are the original parts, at any TP size.

The module computes with the fused local tensor, this rank's rows of every part in order, which
``joined_local`` lends its forward. Parts along dimension 0 (an ``nn.Linear``'s output features)
are created as views of one buffer holding those rows, so the join is that buffer, not a copy.
Elsewhere (parts along a later dimension, which FSDP2 wants contiguous: GPT-2's ``Conv1D``, packed
experts' ``gate_up_proj``; parameters something replaced, such as FSDP2's unsharded ones or
``model.to()``'s) the join concatenates them, a copy of the local weight at each forward. Outside
its forward the module's fused name holds None.

Example::
    >>> # phi3 qkv_proj at tp=2, 8 query heads and 2 kv heads of 4 rows
    >>> names = part_names("weight", 3)        # ['weight_part0', 'weight_part1', 'weight_part2']
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from .collectives import f_together
from .layouts import Layout, Part


def part_names(name: str, parts: int) -> list[str]:
    return [f"{name}_part{i}" for i in range(parts)]


def stored_in_parts(layout: Layout) -> bool:
    return len(layout.parts) > 1


def _local_sizes(layout: Layout, tp: int, rank: int) -> list[int]:
    return [len(part.local_rows(tp, rank)) for part in layout.parts]


def split_into_parts(tensor: torch.Tensor, layout: Layout, dim: int, mesh: DeviceMesh) -> list[DTensor]:
    """The parts of the whole ``tensor``, as DTensors on ``mesh``. Where no part repeats rows over
    ranks, their local tensors are views of one buffer of this rank's rows, in the layout's order."""
    tp, rank = mesh.size(), mesh.get_local_rank()
    wholes = tensor.split([part.rows for part in layout.parts], dim=dim)
    if layout.repeats_rows(tp):
        # each part alone: the ones shared by several ranks whole, the others this rank's rows
        return [DTensor.from_local(whole.contiguous(), mesh, [Replicate()], run_check=False) if part.repeats(tp)
                else _sharded_part(whole.chunk(tp, dim=dim)[rank].contiguous(), whole.shape, dim, mesh)
                for part, whole in zip(layout.parts, wholes, strict=True)]
    buffer = layout.shard(tensor, dim, tp, rank)
    pieces = buffer.split(_local_sizes(layout, tp, rank), dim=dim)
    # FSDP2 takes only contiguous parameters: parts along a later dimension are copies, joined by a copy
    return [_sharded_part(piece.contiguous(), whole.shape, dim, mesh) for piece, whole in zip(pieces, wholes, strict=True)]


def _sharded_part(local: torch.Tensor, shape: torch.Size, dim: int, mesh: DeviceMesh) -> DTensor:
    return DTensor.from_local(local, mesh, [Shard(dim)], run_check=False, shape=shape,
                              stride=torch.empty(shape, device="meta").stride())


def joined_local(parts: list[torch.Tensor], layout: Layout, dim: int, mesh: DeviceMesh) -> torch.Tensor:
    """The fused local tensor of ``parts`` (the part parameters, as the module holds them now):
    this rank's rows of every part, in order, with gradients flowing back to each part."""
    tp = mesh.size()
    locals_ = [part.to_local() if isinstance(part, DTensor) else part for part in parts]
    if layout.repeats_rows(tp):
        # each rank computes with its rows of the shared parts; their gradients are summed in one all-reduce
        shared = [i for i, part in enumerate(layout.parts) if part.repeats(tp)]
        wholes = [locals_[i] for i in shared]
        if any(whole.requires_grad for whole in wholes):
            wholes = f_together(wholes, mesh.get_group())
        for i, whole in zip(shared, wholes, strict=True):
            locals_[i] = Layout((layout.parts[i],)).shard(whole, dim, tp, mesh.get_local_rank())
    elif not torch.compiler.is_compiling() and _adjacent(locals_, dim):
        return _Joined.apply(dim, *locals_)
    return torch.cat(locals_, dim=dim)


def _adjacent(tensors: list[torch.Tensor], dim: int) -> bool:
    """Whether ``tensors`` lie in one storage exactly as the slices of their concatenation along ``dim``."""
    first = tensors[0]
    offset = first.storage_offset()
    storage = first.untyped_storage().data_ptr()
    for tensor in tensors:
        if (tensor.untyped_storage().data_ptr() != storage or tensor.stride() != first.stride()
                or tensor.storage_offset() != offset or tensor.dtype != first.dtype):
            return False
        offset += tensor.shape[dim] * tensor.stride(dim)
    return True


class _Joined(torch.autograd.Function):
    """The concatenation of adjacent slices of one storage, as a view of it (no copy); in the
    backward each slice gets its own rows of the gradient."""

    @staticmethod
    def forward(ctx, dim: int, *parts: torch.Tensor):
        ctx.dim, ctx.sizes = dim, [part.shape[dim] for part in parts]
        first = parts[0]
        shape = list(first.shape)
        shape[dim] = sum(ctx.sizes)
        return first.as_strided(shape, first.stride(), first.storage_offset())

    @staticmethod
    def backward(ctx, grad):
        return None, *grad.split(ctx.sizes, dim=ctx.dim)


def joined_whole(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """The original fused tensor from the parts' whole tensors."""
    return torch.cat(parts, dim=dim)
