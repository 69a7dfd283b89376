"""A tensor laid out like a fused parameter (the parameter, or an optimizer state of its shape) as
parts that do not depend on the mesh: what DCP stores for it.

How a rank holds a fused parameter's rows depends on the TP size (tp/sharding/tags.py): packed in
rank order (a permutation of the original that changes with the TP size), ``_StridedShard``, or
whole where rows repeat over ranks. DCP reshards by placements alone, so it would store a packed
permutation as if it were the tensor (and read it back scrambled at another TP size), and it
refuses FSDP2's dp shard nested over ``_StridedShard`` (``overlapping chunks``). Stored part by
part, each part an evenly sharded DTensor on the TP mesh (``Shard``, or ``Replicate`` where rows
repeat), the tensor reads back at any TP size and any dp size.

Under FSDP2 a rank holds its dp chunk of dim 0 of its TP rows, chunked as ``torch.chunk`` chunks
(the last ranks may hold empty chunks): ``tp_rows`` gathers the chunks over dp, ``dp_chunk``
takes this rank's back.

Example::
    >>> parts = to_parts(optimizer.state[param]["exp_avg"], shard)   # [q, k, v] of phi3's qkv_proj
    >>> from_parts(parts, shard, into=other_optimizer.state[other_param]["exp_avg"])
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from ..errors import CheckpointError
from ..sharding.tags import LocalShard


def part_name(name: str, index: int) -> str:
    return f"{name}.part{index}"


def to_parts(tensor: torch.Tensor, shard: LocalShard) -> list[DTensor]:
    """``tensor``'s parts (a collective over dp under FSDP2): DTensors on the TP mesh whose global
    views are the original tensor's parts."""
    rows = tp_rows(tensor.detach(), shard)
    mesh, dim = shard.mesh, shard.dim
    if shard.layout.repeats_rows(mesh.size()):  # stored whole: each part whole on every rank
        pieces = rows.split([p.rows for p in shard.layout.parts], dim=dim)
        return [DTensor.from_local(piece.contiguous(), mesh, [Replicate()], run_check=False) for piece in pieces]
    tp, rank = mesh.size(), mesh.get_local_rank()
    sizes = [len(p.local_units(tp, rank)) * p.unit_rows for p in shard.layout.parts]
    parts = []
    for part, piece in zip(shard.layout.parts, rows.split(sizes, dim=dim), strict=True):
        shape = list(rows.shape)
        shape[dim] = part.rows
        parts.append(DTensor.from_local(piece.contiguous(), mesh, [Shard(dim)], run_check=False,
                                        shape=torch.Size(shape), stride=torch.empty(shape, device="meta").stride()))
    return parts


def from_parts(parts: list[DTensor], shard: LocalShard, *, into: torch.Tensor) -> None:
    """Copy this rank's rows of ``parts`` into ``into`` (a tensor laid out as ``to_parts`` read it)."""
    rows = torch.cat([part.to_local() for part in parts], dim=shard.dim)
    target = into.to_local() if isinstance(into, DTensor) else into
    with torch.no_grad():
        target.copy_(dp_chunk(rows, into, shard))


def tp_rows(tensor: torch.Tensor, shard: LocalShard) -> torch.Tensor:
    """This TP rank's rows of ``tensor`` (every row where rows repeat), gathered over FSDP2's dp shard."""
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    dp = _dp_shard_dim(tensor, shard)
    if dp is None:
        return local
    group = tensor.device_mesh.get_group(dp)
    total, chunk = _dp_chunking(tensor, shard, dist.get_world_size(group))
    padded = local.new_zeros((chunk, *local.shape[1:]))
    padded[:local.shape[0]] = local
    chunks = [torch.empty_like(padded) for _ in range(dist.get_world_size(group))]
    dist.all_gather(chunks, padded, group=group)
    return torch.cat(chunks)[:total]


def dp_chunk(rows: torch.Tensor, like: torch.Tensor, shard: LocalShard) -> torch.Tensor:
    """This rank's FSDP2 chunk of its TP rows ``rows``, held as ``like`` holds its own."""
    dp = _dp_shard_dim(like, shard)
    if dp is None:
        return rows
    total, chunk = _dp_chunking(like, shard, like.device_mesh.size(dp))
    start = min(like.device_mesh.get_local_rank(dp) * chunk, total)
    return rows[start:min(start + chunk, total)]


def _dp_chunking(tensor: DTensor, shard: LocalShard, dp_size: int) -> tuple[int, int]:
    """(the TP rows' length along dim 0, the length of a full dp chunk of it), as FSDP2 chunks."""
    tp, rank = shard.mesh.size(), shard.mesh.get_local_rank()
    if shard.dim != 0:
        total = tensor.shape[0]
    elif shard.layout.repeats_rows(tp):
        total = shard.layout.size
    else:
        total = len(shard.layout.rows(tp, rank))
    return total, -(-total // dp_size)


def _dp_shard_dim(tensor: torch.Tensor, shard: LocalShard) -> int | None:
    """The mesh dimension of ``tensor`` other than the TP mesh's that shards it (FSDP2's), or None.
    Refuses a layout no resharding here can read: more than one such dimension, or one that shards
    a dimension other than 0."""
    if not isinstance(tensor, DTensor) or tensor.device_mesh.ndim == 1:
        return None
    mesh, tp_name = tensor.device_mesh, shard.mesh.mesh_dim_names
    names = mesh.mesh_dim_names or ()
    tp_dim = names.index(tp_name[0]) if tp_name and tp_name[0] in names else mesh.ndim - 1
    sharding = [i for i, p in enumerate(tensor.placements) if i != tp_dim and not isinstance(p, Replicate)]
    if not sharding:
        return None
    placement = tensor.placements[sharding[0]]
    if len(sharding) > 1 or not isinstance(placement, (Shard, _StridedShard)) or placement.dim != 0:
        raise CheckpointError(f"a fused parameter's tensor on mesh {names or mesh.shape} has placements "
                              f"{tensor.placements}: tp.dcp reshards FSDP2's shard of dim 0 over one mesh "
                              "dimension besides the TP mesh, not this")
    return sharding[0]
