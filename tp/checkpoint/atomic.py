"""A checkpoint directory replaced whole: a crash at any point leaves the old checkpoint or the new one.

A save writes into a temporary directory beside the target (``.NAME.tp-save-XXXXXXXX``), then
swaps it in. Files of the old directory that the save does not replace (a tokenizer, a README)
are carried into the new one first, as hard links (copies where the file system has none);
the old checkpoint's weight files are not, so no stale shard or index survives.

The swap is one ``renameat2(RENAME_EXCHANGE)`` where the file system has it (Linux: ext4, xfs,
btrfs, tmpfs): the target path holds the old directory or the new one at every instant. Where it
has not (some network file systems), the old directory is renamed aside
(``.NAME.tp-old-XXXXXXXX``) and the new one renamed in: a crash between the two renames
leaves no directory at the target, and loading it then names where the old checkpoint is.

A temporary directory left by a crashed save is removed, with a warning naming it, by the next
save to the same target; only while the target is missing and a previous version is beside it
are they kept (and named): that one may be the only copy.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

from ..errors import CheckpointError
from .ranks import ENTRY_TIMEOUT_S, agree, enter_together, world

_SAVING, _PREVIOUS = "tp-save", "tp-old"
_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def save_directory(what: str, directory: str | os.PathLike, write: Callable[[Path], None],
                   replaced: Callable[[str], bool], timeout: float = ENTRY_TIMEOUT_S) -> None:
    """A collective save of ``directory`` that replaces it whole or not at all, on every rank.

    Every rank enters (or the callers are refused after ``timeout`` s, not hung); rank 0 makes
    the temporary directory; ``write(temporary)`` runs on every rank (it may hold collectives);
    rank 0 swaps the result in. Each step's outcome is agreed, so a failure anywhere is the same
    ``CheckpointError`` on every rank, and the temporary directory is removed.
    """
    target = Path(directory).absolute()
    enter_together(what, target, timeout)
    rank0 = world()[0] == 0
    temporary = agree(lambda: begin(target) if rank0 else None, what=what, share=True)
    try:
        agree(lambda: write(temporary), what=what)
        agree(lambda: swap_in(temporary, target, replaced) if rank0 else None, what=what)
    except BaseException:
        if rank0:
            remove(temporary)
        raise


def _sibling(target: Path, kind: str, tag: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{tag}"


def leftovers(target: Path) -> list[Path]:
    """Directories earlier saves to ``target`` left beside it: in-progress or previous versions."""
    return sorted(p for kind in (_SAVING, _PREVIOUS) for p in target.parent.glob(f".{target.name}.{kind}-*"))


def previous_versions(target: Path) -> list[Path]:
    """Old checkpoints the fallback swap moved aside and a crash left there, newest first."""
    found = target.parent.glob(f".{target.name}.{_PREVIOUS}-*") if target.parent.is_dir() else []
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def begin(target: Path) -> Path:
    """A fresh, empty temporary directory beside ``target``, after clearing what crashed saves left."""
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} is a file; a checkpoint is saved as a directory: pass a directory path")
    target.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(target)
    temporary = _sibling(target, _SAVING, uuid.uuid4().hex[:8])
    temporary.mkdir()
    return temporary


def _clear_leftovers(target: Path) -> None:
    found = leftovers(target)
    if not found:
        return
    names = ", ".join(str(p) for p in found)
    if not target.is_dir() and previous_versions(target):  # a fallback swap stopped between its renames
        warnings.warn(f"tp: kept {names}, left by an interrupted save while {target} is missing: the "
                      f"{_PREVIOUS} one is the previous checkpoint; rename it to {target.name} to restore it, "
                      "or remove them", stacklevel=4)
        return
    for path in found:  # debris: the target is whole, or no save ever finished
        remove(path)
    warnings.warn(f"tp: removed {names}, left beside {target} by an interrupted save", stacklevel=4)


def swap_in(temporary: Path, target: Path, replaced: Callable[[str], bool]) -> None:
    """Make the complete ``temporary`` directory the ``target``; ``replaced(name)`` says which files
    of the old target the new checkpoint replaces (the others are carried over)."""
    if not target.is_dir():
        os.rename(temporary, target)  # fails, rather than merges, if a directory appeared there meanwhile
        _sync(target.parent)
        return
    _carry_over(target, temporary, replaced)
    _sync_tree(temporary)
    if _exchange(temporary, target):
        _sync(target.parent)
        remove(temporary)  # now the old checkpoint
        return
    previous = _sibling(target, _PREVIOUS, temporary.name.rsplit("-", 1)[1])
    os.rename(target, previous)
    try:
        os.rename(temporary, target)
    except OSError:
        os.rename(previous, target)  # put the old one back: a failed save leaves it as it was
        raise
    _sync(target.parent)
    remove(previous)


def _carry_over(old: Path, new: Path, replaced: Callable[[str], bool]) -> None:
    """Hard-link into ``new`` every entry of ``old`` that the new checkpoint neither writes nor replaces."""
    for entry in old.iterdir():
        destination = new / entry.name
        if replaced(entry.name) or os.path.lexists(destination):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), destination)
        elif entry.is_dir():
            shutil.copytree(entry, destination, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, destination)


def _link_or_copy(source, destination) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step; False where the system or file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, f"cannot swap {a} and {b}: {os.strerror(code)}")


def _sync_tree(directory: Path) -> None:
    """Flush the new checkpoint to disk before it replaces the old one (a power cut, not only a crash)."""
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                _sync(Path(path))
        _sync(Path(root))


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Delete a temporary or previous checkpoint directory, as far as possible."""
    shutil.rmtree(path, ignore_errors=True)
