"""torch.distributed.checkpoint for sharded models and their optimizers, resharding across mesh
shapes: saved on a (dp, tp) = (2, 2) mesh under FSDP2, loaded at (1, 4), (4, 1) or plain TP 4.

The state is torch's own (``get_state_dict`` / ``set_state_dict``: model and optimizer together,
under FSDP2 or not) with one change: a fused weight (``[q; k; v]``, ``[gate; up]``, Yuan's v/o
halves, kv heads repeated over ranks), and each optimizer state of its shape (AdamW's moments), is
stored part by part as ``NAME.part0``, ``NAME.part1``, ... (``parts.py`` says why), so the
checkpoint does not depend on the mesh it was written on. The model's entries are at the top, the
optimizer's under ``optimizer``; a checkpoint saved without an optimizer loads the model alone.

``save`` writes into a temporary directory and swaps it in whole, as ``tp.save_pretrained``
does (``atomic.py``; every rank writes into rank 0's temporary directory, so ranks on several
hosts need a file system they share, as a DCP checkpoint directory does anyway). Failures are
one ``tp.CheckpointError`` on every rank, its first cause in one line. A checkpoint that holds a
fused weight whole (torch's state dict saved directly) is refused: its rows may be in the order
of the TP size it was saved at.

Example::
    >>> tp.dcp.save(model, "ckpt", optimizer=optimizer)        # (dp, tp) = (2, 2)
    >>> tp.dcp.load(other_model, "ckpt", optimizer=other_opt)  # (1, 4), (4, 1), TP=1, ...
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from ..errors import CheckpointError
from ..sharding.tags import LocalShard, layouts_by_name
from .atomic import save_directory
from .files import existing_directory
from .parts import from_parts, part_name, to_parts
from .ranks import ENTRY_TIMEOUT_S, agree, one_line

OPTIMIZER = "optimizer"  # the key of the optimizer's state in a checkpoint (the model's are at the top)


class TrainingState(Stateful):
    """A sharded model and its optimizer as torch.distributed.checkpoint saves and loads them, so a
    checkpoint resumes at any mesh shape: (dp, tp) (2, 2) saved, (1, 4) or (4, 1) loaded.

    It wraps torch's ``get_state_dict`` / ``set_state_dict`` (which handle FSDP2 and the optimizer's
    parameter ids) and stores each fused parameter, and each optimizer state of its shape, part by
    part (``parts.py``): its DTensor's global view is a permutation that depends on the TP size.
    ``tp.dcp.save`` / ``tp.dcp.load`` use it; pass it to ``dcp.save`` / ``dcp.load`` / ``dcp.async_save``
    yourself for your own storage.

    Example::
        >>> dcp.save({"train": tp.dcp.TrainingState(model, optimizer)}, checkpoint_id="ckpt")
        >>> dcp.load({"train": tp.dcp.TrainingState(model, optimizer)}, checkpoint_id="ckpt")
    """

    def __init__(self, model: nn.Module, optimizer: Optimizer | Iterable[Optimizer] | None = None):
        self.model = model
        self.optimizers = () if optimizer is None else (optimizer,) if isinstance(optimizer, Optimizer) else tuple(optimizer)
        self._held: tuple[dict, dict] | None = None

    def state_dict(self) -> dict[str, Any]:
        """The state to save, or to load into (a collective under FSDP2: call it on every rank)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizers)
        self._held = model_state, optim_state
        layouts = layouts_by_name(self.model)
        state = {}
        for name, value in model_state.items():
            shard = layouts.get(name)
            state.update(_split(name, value, shard) if shard else {name: value})
        if self.optimizers:
            per_param = {}
            for name, entry in optim_state["state"].items():
                shard = layouts.get(name)
                per_param[name] = _split_optimizer_entry(name, entry, shard, model_state[name]) if shard else entry
            state[OPTIMIZER] = {**optim_state, "state": per_param}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put loaded ``state`` (what ``state_dict()`` returned, filled by ``dcp.load``) into the model and optimizer."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        if self._held is None:
            raise RuntimeError("TrainingState.load_state_dict needs state_dict() first (dcp.load calls both)")
        model_state, optim_state = self._held
        layouts = layouts_by_name(self.model)
        for name in model_state:
            shard = layouts.get(name)
            model_state[name] = _joined(state, name, shard, model_state[name]) if shard else state[name]
        if self.optimizers:
            loaded = state[OPTIMIZER]
            for name, entry in optim_state["state"].items():
                shard = layouts.get(name)
                for key, value in entry.items():
                    entry[key] = (_joined(loaded["state"][name], key, shard, value) if shard and _is_like(value, model_state[name])
                                  else loaded["state"][name][key])
            optim_state["param_groups"] = loaded["param_groups"]
        set_state_dict(self.model, self.optimizers, model_state_dict=model_state, optim_state_dict=optim_state)


def _split(name: str, value: torch.Tensor, shard: LocalShard) -> dict[str, DTensor]:
    return {part_name(name, i): part for i, part in enumerate(to_parts(value, shard))}


def _joined(state: dict[str, Any], name: str, shard: LocalShard, into: torch.Tensor) -> torch.Tensor:
    from_parts([state[part_name(name, i)] for i in range(len(shard.layout.parts))], shard, into=into)
    return into


def _is_like(value: Any, param: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.shape == param.shape


def _split_optimizer_entry(name: str, entry: dict[str, Any], shard: LocalShard, param: torch.Tensor) -> dict[str, Any]:
    """A fused parameter's optimizer state with each tensor of its shape in parts; scalars (AdamW's
    step) as they are. Another tensor (a factored second moment) would be stored in the order of
    this TP size: refused."""
    out = {}
    for key, value in entry.items():
        if _is_like(value, param):
            out.update(_split(key, value, shard))
        elif isinstance(value, torch.Tensor) and value.dim() > 0:
            raise CheckpointError(f"optimizer state {key!r} of {name} has shape {tuple(value.shape)}, not the "
                                  f"parameter's {tuple(param.shape)}: tp.dcp cannot store it independently of the TP size")
        else:
            out[key] = value
    return out


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


def _stored_metadata(directory: Path) -> dict:
    """The checkpoint's tensor metadata by name; a ``.metadata`` torch cannot read is a ``CheckpointError``."""
    import torch.distributed.checkpoint as dcp

    try:
        return dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 - a corrupt file raises whatever unpickling raises
        rank = dist.get_rank() if dist.is_initialized() else 0
        raise CheckpointError(f"{directory}: torch.distributed.checkpoint failed on rank {rank}: "
                              f"{one_line(e)}") from None


def save(model: nn.Module, checkpoint_id: str | os.PathLike, *, optimizer: Optimizer | Iterable[Optimizer] | None = None,
         timeout: float = ENTRY_TIMEOUT_S) -> None:
    """Save a sharded model, and ``optimizer``'s state if given, with torch.distributed.checkpoint,
    replacing ``checkpoint_id`` whole.

    A collective: call it on every rank (a call on only some ranks is refused after ``timeout``
    seconds, not hung).
    """
    import torch.distributed.checkpoint as dcp

    def write(temporary: Path) -> None:
        state = TrainingState(model, optimizer).state_dict()  # collectives, so after every rank entered
        with dcp_errors(Path(checkpoint_id)):
            dcp.save(state, checkpoint_id=temporary)

    save_directory("tp.dcp.save", checkpoint_id, write, replaced=is_dcp_file, timeout=timeout)


def load(model: nn.Module, checkpoint_id: str | os.PathLike, *,
         optimizer: Optimizer | Iterable[Optimizer] | None = None) -> None:
    """Load a checkpoint written by ``save`` (at any mesh shape) into a model sharded at any mesh
    shape, and into ``optimizer`` if given (the checkpoint must then hold an optimizer's state).

    A collective: call it on every rank; it succeeds on every rank or raises the same error on every rank.
    """
    import torch.distributed.checkpoint as dcp

    training = TrainingState(model, optimizer)
    state = training.state_dict()

    def read() -> None:
        directory = existing_directory(checkpoint_id)
        if not (directory / ".metadata").is_file():
            raise CheckpointError(f"{directory}: no .metadata file, so not a torch.distributed.checkpoint "
                                  "checkpoint (tp.dcp.save writes one; for Hugging Face files use tp.from_pretrained)")
        stored = _stored_metadata(directory)
        _check_stored_in_parts(directory, stored, layouts_by_name(model), bool(training.optimizers))
        with dcp_errors(directory):
            dcp.load(state, checkpoint_id=directory)

    agree(read, what=f"tp.dcp.load({checkpoint_id})")
    training.load_state_dict(state)
    if dist.is_initialized():
        dist.barrier()


def _check_stored_in_parts(directory: Path, stored: dict, layouts: dict[str, LocalShard], optimizer: bool) -> None:
    """Refuse a checkpoint that holds a fused parameter whole (torch's ``get_state_dict`` saved by
    ``dcp.save`` directly): its rows are in the order of the TP size it was saved at, which the
    checkpoint does not record. Also name a missing optimizer state before DCP's generic error."""
    whole = [name for name in layouts if part_name(name, 0) not in stored and name in stored]
    if whole:
        raise CheckpointError(
            f"{directory}: {len(whole)} parameters that tp.dcp stores part by part are stored whole, as torch's "
            f"get_state_dict gives them ({', '.join(whole[:3])}{', ...' if len(whole) > 3 else ''}): a fused "
            "parameter's rows may then be in the order of the TP size it was saved at, which the checkpoint does "
            "not record, so tp.dcp will not guess it; save with tp.dcp.save(model, path, optimizer=...) or "
            "dcp.save({...: tp.dcp.TrainingState(model, optimizer)})")
    if optimizer and not any(key.startswith(f"{OPTIMIZER}.") for key in stored):
        raise CheckpointError(f"{directory}: holds no optimizer state (saved by tp.dcp.save without optimizer=), "
                              "so the optimizer cannot resume from it; load the model alone")
