"""Every rank takes the same way out of a checkpoint collective: all succeed, or all raise one error.

A load that fails on one rank (its copy of a file is truncated, its rows reach a bad byte
range) and succeeds on the others would leave the ranks out of step: the next collective hangs,
or a half-loaded model trains. ``agree`` runs a step on every rank, then gathers the outcomes
(one small ``all_gather_object``) so every rank raises the first failing rank's
``CheckpointError``, or every rank goes on.

A save called on only some ranks (``if rank == 0: tp.save_pretrained(...)``) would hang in its
first collective. ``enter_together`` is a rendezvous on the process group's key-value store
with a timeout, before any collective: the ranks that called it get a ``CheckpointError``
naming the ranks that did not, instead of a hang, and a rank that calls it later gets one at
once. Ranks that skipped the call are out of step with the others afterwards (they count one
checkpoint call fewer), so the program should end; that is the message's advice.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch.distributed as dist

from ..errors import CheckpointError

T = TypeVar("T")
ENTRY_TIMEOUT_S = 300.0  # how long the first rank into a save waits for the last
_entries = itertools.count()


def world() -> tuple[int, int]:
    """(this rank, number of ranks) of the default process group; (0, 1) without one."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def enter_together(what: str, directory: Path, timeout: float = ENTRY_TIMEOUT_S) -> None:
    """Return once every rank has called ``what`` on the same ``directory``; refuse after ``timeout``
    seconds naming the ranks that did not, or when the ranks name different directories.

    The outcome is decided once, atomically, on the store: the last rank to arrive marks the
    entry complete, a rank that waited ``timeout`` marks it refused, whichever comes first. A rank
    that arrives after a refusal is refused at once, not left waiting in the next collective.
    """
    rank, size = world()
    if size == 1:
        return
    from torch.distributed.distributed_c10d import _get_default_store

    store, entry = _get_default_store(), next(_entries)
    prefix = f"tp.checkpoint/{entry}"
    store.set(f"{prefix}/{rank}", f"{what} {directory}")
    if store.add(f"{prefix}/entered", 1) == size:
        state = store.compare_set(f"{prefix}/state", "", "complete")
    else:
        try:
            store.wait([f"{prefix}/state"], timedelta(seconds=timeout))
            state = store.get(f"{prefix}/state")
        except dist.DistError:
            state = store.compare_set(f"{prefix}/state", "", "refused")
    if state != b"complete":
        absent = [r for r in range(size) if not store.check([f"{prefix}/{r}"])]
        late = (f"but not on rank(s) {', '.join(map(str, absent))} within {timeout:g} s" if absent else
                "after the other ranks had given up waiting for it")
        raise CheckpointError(f"{what}({directory}) is a collective, called on rank {rank} {late}: call it on every "
                              "rank. Nothing was written; the ranks are now out of step, so end the program")
    calls = [store.get(f"{prefix}/{r}").decode() for r in range(size)]
    if len(set(calls)) > 1:
        listed = "; ".join(f"rank {r}: {call}" for r, call in enumerate(calls))
        raise CheckpointError(f"the ranks called different checkpoint saves ({listed}); call the same one with "
                              "the same directory on every rank. Nothing was written")
    if rank == 0 and entry > 0:  # every rank is past the previous entry: its keys are done with
        for key in [f"tp.checkpoint/{entry - 1}/{r}" for r in range(size)] + \
                   [f"tp.checkpoint/{entry - 1}/entered", f"tp.checkpoint/{entry - 1}/state"]:
            store.delete_key(key)


def agree(step: Callable[[], T], *, what: str, share: bool = False) -> T:
    """``step()`` on this rank, then the same outcome on every rank: its value (rank 0's with
    ``share``, which must then be small and picklable), or the first failing rank's error.

    A ``CheckpointError`` keeps its message; any other exception (a disk that is full, a
    permission denied) becomes one, ``what`` and the cause in one line.
    """
    rank, size = world()
    value, failure, cause = None, None, None
    try:
        value = step()
    except CheckpointError as e:
        failure, cause = str(e), e
    except Exception as e:  # noqa: BLE001 - every rank must leave the same way, whatever went wrong
        failure, cause = f"{what} failed: {one_line(e)}", e
    if size == 1:
        if cause is not None:
            raise cause if isinstance(cause, CheckpointError) else CheckpointError(failure) from cause
        return value
    outcomes: list = [None] * size
    dist.all_gather_object(outcomes, (failure, value if share and rank == 0 else None))
    failed = [r for r, (f, _) in enumerate(outcomes) if f is not None]
    if failed:
        where = "" if len(failed) == size else f" (on rank {', '.join(map(str, failed))} of {size}; every rank stops)"
        raise CheckpointError(outcomes[failed[0]][0] + where) from cause
    return outcomes[0][1] if share else value


def one_line(error: BaseException) -> str:
    """``Type: first line of the message``."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
