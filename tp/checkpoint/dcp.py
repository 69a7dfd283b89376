"""torch.distributed.checkpoint for sharded models and their optimizers, resharding across mesh
shapes: saved on a (dp, tp) = (2, 2) mesh under FSDP2, loaded at (1, 4), (4, 1) or plain TP 4.

The state is torch's own (``get_state_dict`` / ``set_state_dict``: model and optimizer together,
under FSDP2 or not). Every parameter of a sharded model is a DTensor whose global view is the
original tensor (a fused weight is stored as one parameter per part: tp/sharding/fused.py), so DCP
reshards them all itself. The model's entries are at the top, the optimizer's under
``optimizer``; a checkpoint saved without an optimizer loads the model alone.

``save`` writes into a temporary directory and swaps it in whole, as ``tp.save_pretrained``
does (``atomic.py``; every rank writes into rank 0's temporary directory, so ranks on several
hosts need a file system they share, as a DCP checkpoint directory does anyway). Failures are
one ``tp.CheckpointError`` on every rank, its first cause in one line.

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

import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful
from torch.optim import Optimizer

from ..errors import CheckpointError
from .atomic import save_directory
from .files import existing_directory
from .ranks import ENTRY_TIMEOUT_S, agree, one_line

OPTIMIZER = "optimizer"  # the key of the optimizer's state in a checkpoint (the model's are at the top)


class TrainingState(Stateful):
    """A sharded model and its optimizer as torch.distributed.checkpoint saves and loads them, so a
    checkpoint resumes at any mesh shape: (dp, tp) (2, 2) saved, (1, 4) or (4, 1) loaded.

    It wraps torch's ``get_state_dict`` / ``set_state_dict`` (which handle FSDP2 and the optimizer's
    parameter ids). ``tp.dcp.save`` / ``tp.dcp.load`` use it; pass it to ``dcp.save`` / ``dcp.load``
    / ``dcp.async_save`` yourself for your own storage.

    Example::
        >>> dcp.save({"train": tp.dcp.TrainingState(model, optimizer)}, checkpoint_id="ckpt")
        >>> dcp.load({"train": tp.dcp.TrainingState(model, optimizer)}, checkpoint_id="ckpt")
    """

    def __init__(self, model: nn.Module, optimizer: Optimizer | Iterable[Optimizer] | None = None):
        self.model = model
        self.optimizers = () if optimizer is None else (optimizer,) if isinstance(optimizer, Optimizer) else tuple(optimizer)

    def state_dict(self) -> dict[str, Any]:
        """The state to save, or to load into (a collective under FSDP2: call it on every rank)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizers)
        return {**model_state, OPTIMIZER: optim_state} if self.optimizers else model_state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put loaded ``state`` (what ``state_dict()`` returned, filled by ``dcp.load``) into the model and optimizer."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        model_state = {name: value for name, value in state.items() if name != OPTIMIZER}
        set_state_dict(self.model, self.optimizers, model_state_dict=model_state,
                       optim_state_dict=state.get(OPTIMIZER, {}))


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
        if training.optimizers and not any(key.startswith(f"{OPTIMIZER}.") for key in stored):
            raise CheckpointError(f"{directory}: holds no optimizer state (saved by tp.dcp.save without optimizer=), "
                                  "so the optimizer cannot resume from it; load the model alone")
        with dcp_errors(directory):
            dcp.load(state, checkpoint_id=directory)

    agree(read, what=f"tp.dcp.load({checkpoint_id})")
    training.load_state_dict(state)
    if dist.is_initialized():
        dist.barrier()
