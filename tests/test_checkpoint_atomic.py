"""Atomic saves: a save killed at any point over an existing checkpoint leaves the old checkpoint or
the new one, bit for bit, with no stale shard or index; the next save clears what the crash left.

The writing rank is killed with ``os._exit`` (no cleanup, no ``finally``) in a forked child of
the test process, at each step of ``tp.save_pretrained``: while writing the temporary directory,
after writing it, just before the swap, just after it, and between the two renames of the
fallback swap (file systems without ``renameat2(RENAME_EXCHANGE)``). Distributed saves (the same
steps, on rank 0, with the gather before them) are in tests/test_checkpoint_ranks.py.
"""

import os
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

import tp
import tp.testing.models
from tp.checkpoint import atomic

OLD_SEED, NEW_SEED = 0, 1
CRASHED = 17  # the exit code of a child killed at its crash point


def _model(seed: int):
    return tp.testing.models.tiny_model("llama", seed=seed, num_hidden_layers=1)


def _weights(directory) -> dict[str, torch.Tensor]:
    """What transformers loads from ``directory``: stale files there would be read silently."""
    return {n: p.detach().clone() for n, p in AutoModelForCausalLM.from_pretrained(directory).named_parameters()}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def _exit_on_call(module, name: str, call: int = 1):
    """Replace ``module.name`` by a function that kills the process on its ``call``-th call."""
    original, calls = getattr(module, name), []

    def crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os._exit(CRASHED)
        return original(*args, **kwargs)

    setattr(module, name, crash)


def _no_exchange(*_):
    return False  # as on a file system without RENAME_EXCHANGE


def _crash_in_child(point: str, target, sharded_new: bool) -> int:
    """Save the new model over ``target`` in a forked child killed at ``point``; its exit code."""
    pid = os.fork()
    if pid == 0:  # the child: never returns to pytest
        try:
            import transformers.modeling_utils

            if point == "writing":  # killed before its last weights file is written
                _exit_on_call(transformers.modeling_utils, "safe_save_file", call=2 if sharded_new else 1)
            elif point == "written":
                _exit_on_call(atomic, "_carry_over")
            elif point == "before swap":
                _exit_on_call(atomic, "_exchange")
            elif point == "after swap":
                _exit_on_call(atomic, "remove")
            elif point == "fallback between renames":
                atomic._exchange = _no_exchange
                _exit_on_call(atomic.os, "rename", call=2)
            elif point == "fallback after renames":
                atomic._exchange = _no_exchange
                _exit_on_call(atomic, "remove")
            tp.save_pretrained(_model(NEW_SEED), target, **({"max_shard_size": "100KB"} if sharded_new else {}))
            os._exit(0)
        except BaseException:  # noqa: BLE001 - a child must never run the rest of the test session
            import traceback

            traceback.print_exc()
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.fixture(scope="module")
def weights():
    return {"old": dict(_model(OLD_SEED).named_parameters()), "new": dict(_model(NEW_SEED).named_parameters())}


@pytest.mark.parametrize("sharded_old", [True, False], ids=["indexed-over", "single-over"])
@pytest.mark.parametrize("point, expected", [
    ("writing", "old"),
    ("written", "old"),
    ("before swap", "old"),
    ("after swap", "new"),
    ("fallback after renames", "new"),
    ("no crash", "new"),
])
def test_crash_leaves_old_or_new_whole(point, expected, sharded_old, weights, tmp_path):
    target = tmp_path / "ckpt"
    _model(OLD_SEED).save_pretrained(target, **({"max_shard_size": "100KB"} if sharded_old else {}))
    (target / "README.md").write_text("kept")  # a file of the directory that is not the checkpoint's
    old_files = sorted(p.name for p in target.iterdir())
    sharded_new = not sharded_old  # the layout changes: a stale index or single file would survive a merge

    code = _crash_in_child(point, target, sharded_new)
    assert code == (0 if point == "no crash" else CRASHED)

    loaded = _weights(target)
    assert _equal(loaded, {n: p.detach() for n, p in weights[expected].items()}), point
    names = sorted(p.name for p in target.iterdir())
    if expected == "old":
        assert names == old_files
    else:  # only the new layout's weight files, and the README carried over
        assert ("model.safetensors.index.json" in names) == sharded_new
        assert ("model.safetensors" in names) == (not sharded_new)
        assert "README.md" in names and (target / "README.md").read_text() == "kept"

    # the next save clears the debris the crash left, naming it, and writes the new checkpoint
    left = atomic.leftovers(target)
    assert bool(left) == (point not in ("no crash",)), left
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tp.save_pretrained(_model(NEW_SEED), target)
    removed = [str(w.message) for w in caught if "interrupted save" in str(w.message)]
    assert bool(removed) == bool(left) and all(str(p) in removed[0] for p in left), removed
    assert atomic.leftovers(target) == []
    assert _equal(_weights(target), {n: p.detach() for n, p in weights["new"].items()})


def test_crash_between_fallback_renames_names_the_old_checkpoint(weights, tmp_path):
    """Without RENAME_EXCHANGE, a crash between the renames leaves no directory at the target:
    loading it is an error that names where the old checkpoint is; the next save keeps it."""
    target = tmp_path / "ckpt"
    _model(OLD_SEED).save_pretrained(target)
    assert _crash_in_child("fallback between renames", target, sharded_new=True) == CRASHED
    assert not target.exists()
    (previous,) = atomic.previous_versions(target)
    with pytest.raises(tp.CheckpointError, match=f"no such directory: {target}; an interrupted save left the "
                                                 f"previous checkpoint at {previous}"):
        tp.load(_model(NEW_SEED), target)
    assert _equal(_weights(previous), {n: p.detach() for n, p in weights["old"].items()})  # whole, bit for bit
    with pytest.warns(UserWarning, match=f"kept .*{previous.name}"):
        tp.save_pretrained(_model(NEW_SEED), target)
    assert previous.is_dir()  # maybe the only copy of the old weights: never removed by a save
    assert _equal(_weights(target), {n: p.detach() for n, p in weights["new"].items()})


def test_save_onto_a_file_is_refused(tmp_path):
    target = tmp_path / "ckpt"
    target.write_text("not a directory")
    with pytest.raises(tp.CheckpointError, match="is a file; a checkpoint is saved as a directory"):
        tp.save_pretrained(_model(NEW_SEED), target)
    assert target.read_text() == "not a directory" and atomic.leftovers(target) == []
