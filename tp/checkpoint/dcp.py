"""torch.distributed.checkpoint for sharded models, resharding across TP sizes.

DCP reshards DTensors by their placements. A fused weight (``[q; k; v]``, ``[gate; up]``,
Yuan's v/o halves) is stored part by part, as ``NAME.part0``, ``NAME.part1``, ...: each part is
an evenly sharded DTensor (or, for kv heads replicated over ranks, a replicated one), so the
checkpoint does not depend on the TP size it was written at. Everything else is stored under
its own name as the model holds it.

``save`` writes into a temporary directory and swaps it in whole, as ``tp.save_pretrained``
does (``atomic.py``; every rank writes into rank 0's temporary directory, so ranks on several
hosts need a file system they share, as a DCP checkpoint directory does anyway). Failures are
one ``tp.CheckpointError`` on every rank, its first cause in one line.

Example::
    >>> tp.dcp.save(model, "ckpt")        # at TP=2
    >>> tp.dcp.load(other_model, "ckpt")  # at TP=4, or TP=1 (a 1-rank mesh)
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..errors import CheckpointError
from ..sharding.tags import LocalShard, layouts_by_name
from .atomic import save_directory
from .files import existing_directory
from .ranks import ENTRY_TIMEOUT_S, agree, one_line


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
    mesh, dim = shard.mesh, shard.dim
    if shard.layout.repeats_rows(mesh.size()):  # stored whole: each part whole on every rank
        pieces = local.split([p.rows for p in shard.layout.parts], dim=dim)
        return [DTensor.from_local(piece.contiguous(), mesh, [Replicate()], run_check=False) for piece in pieces]
    parts = []
    for part, piece in zip(shard.layout.parts, _local_pieces(local, shard)):
        shape = list(local.shape)
        shape[dim] = part.rows
        parts.append(DTensor.from_local(piece.contiguous(), mesh, [Shard(dim)], run_check=False,
                                        shape=torch.Size(shape), stride=torch.empty(shape, device="meta").stride()))
    return parts


def state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[_Split]]:
    """The model's state for DCP, with fused parameters split into their parts."""
    state, splits = {}, []
    params = dict(model.named_parameters())
    layouts = layouts_by_name(model)
    for name, value in model.state_dict().items():
        param, shard = params.get(name), layouts.get(name)
        if param is None or shard is None:
            state[name] = value
            continue
        split = _Split(param, shard, _part_dtensors(param, shard))
        splits.append(split)
        state.update({f"{name}.part{i}": part for i, part in enumerate(split.parts)})
    return state, splits


DCP_FILE = re.compile(r"^(\.metadata|.*\.distcp)$")


def is_dcp_file(name: str) -> bool:
    """A file of a DCP checkpoint, which a new save replaces (other files in the directory are kept)."""
    return DCP_FILE.match(name) is not None


@contextlib.contextmanager
def dcp_errors(directory: Path):
    """torch.distributed.checkpoint's CheckpointException (a BaseException holding every rank's
    traceback) as a ``CheckpointError``: the first failing rank's cause, in one line."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as e:
        rank, (cause, _) = min(e.failures.items(), key=lambda item: item[0])
        raise CheckpointError(f"{directory}: torch.distributed.checkpoint failed on rank {rank}: "
                              f"{one_line(cause)}") from None


def save(model: nn.Module, checkpoint_id: str | os.PathLike, *, timeout: float = ENTRY_TIMEOUT_S) -> None:
    """Save a sharded model with torch.distributed.checkpoint, replacing ``checkpoint_id`` whole.

    A collective: call it on every rank (a call on only some ranks is refused after ``timeout``
    seconds, not hung).
    """
    import torch.distributed.checkpoint as dcp

    def write(temporary: Path) -> None:
        state, _ = state_dict(model)  # gathers replicated kv parts: a collective, so after every rank entered
        with dcp_errors(Path(checkpoint_id)):
            dcp.save(state, checkpoint_id=temporary)

    save_directory("tp.dcp.save", checkpoint_id, write, replaced=is_dcp_file, timeout=timeout)


def load(model: nn.Module, checkpoint_id: str | os.PathLike) -> None:
    """Load a DCP checkpoint written by ``save`` at any TP size into a model sharded at any TP size.

    A collective: call it on every rank; it succeeds on every rank or raises the same error on every rank.
    """
    import torch.distributed.checkpoint as dcp

    state, splits = state_dict(model)

    def read() -> None:
        directory = existing_directory(checkpoint_id)
        if not (directory / ".metadata").is_file():
            raise CheckpointError(f"{directory}: no .metadata file, so not a torch.distributed.checkpoint "
                                  "checkpoint (tp.dcp.save writes one; for Hugging Face files use tp.from_pretrained)")
        with dcp_errors(directory):
            dcp.load(state, checkpoint_id=directory)

    agree(read, what=f"tp.dcp.load({checkpoint_id})")
    for split in splits:
        _put_back(split)
    if dist.is_initialized():
        dist.barrier()


def _put_back(split: _Split) -> None:
    """Copy a parameter's loaded parts into it: this rank's rows of each, in the layout's order."""
    pieces = [loaded.to_local() for loaded in split.parts]
    target = split.param.to_local() if isinstance(split.param, DTensor) else split.param
    with torch.no_grad():
        target.copy_(torch.cat(pieces, dim=split.shard.dim))
