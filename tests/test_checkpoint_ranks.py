"""Rank-consistent checkpoints: a load or save succeeds on every rank or raises the same
CheckpointError on every rank; a save called on only some ranks is refused, not hung; tp.dcp
failures are CheckpointErrors; from_pretrained keeps the checkpoint's dtype.

Worker functions return errors as values, so the tests see every rank's message.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import tp
import tp.testing.models


def _mesh():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (dist.get_world_size(),))


def _outcome(fn, *args, **kwargs) -> str:
    """'ok', or the CheckpointError's message."""
    try:
        fn(*args, **kwargs)
    except tp.CheckpointError as e:
        return str(e)
    return "ok"


def _sharded(seed: int = 0):
    model = tp.testing.models.tiny_model("llama", seed=seed, num_hidden_layers=1)
    tp.apply(model, _mesh())
    return model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ranks") / "llama"
    tp.testing.models.tiny_model("llama", num_hidden_layers=1).save_pretrained(directory, max_shard_size="100KB")
    return directory


def _load_own_copy(directories: list[str]) -> tuple[str, bool]:
    """Each rank loads its own copy (as on hosts with local disks); (outcome, any parameter loaded)."""
    import torch.distributed as dist

    from tp.checkpoint.safetensors import parameters_on_meta

    with parameters_on_meta():
        model = tp.testing.models.build(tp.testing.models.family_config("llama", num_hidden_layers=1))
    tp.apply(model, _mesh())
    outcome = _outcome(tp.load, model, directories[dist.get_rank()])
    return outcome, any(p.device.type != "meta" for p in model.parameters())


def test_a_truncation_only_rank_1_reads_fails_every_rank_the_same_way(llama, tmp_path, pool2):
    copies = [shutil.copytree(llama, tmp_path / f"rank{r}") for r in range(2)]
    index = json.loads((llama / "model.safetensors.index.json").read_text())
    shard = copies[1] / index["weight_map"]["model.layers.0.mlp.down_proj.weight"]
    shard.write_bytes(shard.read_bytes()[:-100])
    results = pool2.run(_load_own_copy, [str(c) for c in copies])
    (message, _), (other, _) = results
    assert message == other, results  # the same error on both ranks, though rank 0's copy is whole
    assert str(shard) in message and "truncated" in message and "(on rank 1 of 2; every rank stops)" in message
    assert not any(loaded for _, loaded in results)  # no rank replaced a parameter


def _save_failing_on_rank0(directory: str) -> str:
    """A save whose rank 0 finds the disk full while finishing its temporary directory."""
    import errno
    import os

    import torch.distributed as dist

    from tp.checkpoint import atomic

    original = atomic._sync_tree

    def disk_full(_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if dist.get_rank() == 0:
        atomic._sync_tree = disk_full
    try:
        return _outcome(tp.save_pretrained, _sharded(seed=1), directory)
    finally:
        atomic._sync_tree = original


def test_a_save_failing_on_rank_0_fails_every_rank_and_keeps_the_old_checkpoint(llama, tmp_path, pool2):
    from tp.checkpoint import atomic

    target = shutil.copytree(llama, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    results = pool2.run(_save_failing_on_rank0, str(target))
    assert results[0] == results[1], results
    assert results[0].startswith("tp.save_pretrained failed: OSError: [Errno 28] No space left on device")
    assert "(on rank 0 of 2; every rank stops)" in results[0]
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # untouched
    assert atomic.leftovers(target) == []  # the temporary directory was removed


def _save(directory: str, seed: int, **kwargs) -> str:
    return _outcome(tp.save_pretrained, _sharded(seed), directory, **kwargs)


def test_a_distributed_save_over_an_indexed_checkpoint_leaves_only_the_new_one(llama, tmp_path, pool2):
    target = shutil.copytree(llama, tmp_path / "ckpt")
    assert pool2.run(_save, str(target), 1) == ["ok", "ok"]
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    expected = tp.testing.models.tiny_model("llama", seed=1, num_hidden_layers=1).state_dict()
    saved = load_file(target / "model.safetensors")
    assert all(torch.equal(saved[n], expected[n]) for n in saved) and set(saved) <= set(expected)


def _save_to_own_directory(directories: list[str]) -> str:
    import torch.distributed as dist

    return _save(directories[dist.get_rank()], 0)


def test_ranks_naming_different_directories_are_refused(tmp_path, pool2):
    directories = [str(tmp_path / f"out{r}") for r in range(2)]
    results = pool2.run(_save_to_own_directory, directories)
    assert results[0] == results[1] and "the ranks called different checkpoint saves" in results[0], results
    assert all(d in results[0] for d in directories)
    assert list(tmp_path.iterdir()) == []  # nothing written


def _save_on_rank0_first(directory: str) -> str:
    """Rank 0 saves alone and is refused; then rank 1 makes the same call, late, and is refused at once."""
    import time

    import torch.distributed as dist

    model = tp.testing.models.tiny_model("llama", num_hidden_layers=1)  # no collective before the save
    outcome = "not called"
    if dist.get_rank() == 0:
        outcome = _outcome(tp.save_pretrained, model, directory, timeout=2)
    dist.barrier()
    if dist.get_rank() == 1:
        start = time.monotonic()
        outcome = _outcome(tp.save_pretrained, model, directory, timeout=60)
        assert time.monotonic() - start < 10, "the late rank waited instead of being refused"
    return outcome


def test_a_save_on_a_subset_of_ranks_is_refused_not_hung(tmp_path, pool2):
    first, late = pool2.run(_save_on_rank0_first, str(tmp_path / "ckpt"))
    assert "tp.save_pretrained(" in first and "called on rank 0 but not on rank(s) 1 within 2 s" in first, first
    assert "called on rank 1 after the other ranks had given up waiting for it" in late, late
    assert all("call it on every rank" in m for m in (first, late))
    assert list(tmp_path.iterdir()) == []
    # both ranks made one call each, so the pool is in step again and saves as usual
    assert pool2.run(_save, str(tmp_path / "ckpt"), 0) == ["ok", "ok"]


def _dcp_save(directory: str, seed: int) -> str:
    return _outcome(tp.dcp.save, _sharded(seed), directory)


def _dcp_load(directory: str) -> tuple[str, list[str]]:
    """Outcome, and the names of tensors that differ from the seed-1 model after the load."""
    model = _sharded(seed=5)
    outcome = _outcome(tp.dcp.load, model, directory)
    expected = tp.testing.models.tiny_model("llama", seed=1, num_hidden_layers=1).state_dict()
    full = tp.full_state_dict(model)
    return outcome, [n for n, t in expected.items() if not torch.equal(full[n], t)]


def test_dcp_save_replaces_the_directory_whole_and_its_errors_are_checkpoint_errors(tmp_path, pool2, pool4):
    target = tmp_path / "dcp"
    assert pool4.run(_dcp_save, str(target), 0) == ["ok"] * 4
    (target / "README.md").write_text("kept")
    assert pool2.run(_dcp_save, str(target), 1) == ["ok", "ok"]
    names = sorted(p.name for p in target.iterdir())
    assert names == [".metadata", "README.md", "__0_0.distcp", "__1_0.distcp"], names  # no rank-2/3 files left
    assert pool2.run(_dcp_load, str(target)) == [("ok", []), ("ok", [])]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert pool2.run(_dcp_load, str(empty))[0][0].startswith(f"{empty}: no .metadata file, so not a torch.distributed")
    (target / ".metadata").write_bytes(b"not a pickle")
    results = pool2.run(_dcp_load, str(target))
    assert results[0][0] == results[1][0], results
    assert results[0][0].startswith(f"{target}: torch.distributed.checkpoint failed on rank 0: "), results
    assert "\n" not in results[0][0]  # the first cause in one line, not every rank's traceback
    assert pool2.run(_dcp_load, str(tmp_path / "nope"))[0][0] == f"no such directory: {tmp_path / 'nope'}"


def _dtypes(directory: str, **kwargs) -> list[str]:
    return sorted({str(p.dtype) for p in tp.from_pretrained(directory, _mesh(), **kwargs).parameters()})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_from_pretrained_keeps_the_checkpoints_dtype(dtype, tmp_path, pool2):
    model = tp.testing.models.tiny_model("llama", num_hidden_layers=1).to(dtype)
    model.save_pretrained(tmp_path / "named")  # config.json names the dtype
    shutil.copytree(tmp_path / "named", tmp_path / "unnamed")
    config = json.loads((tmp_path / "named" / "config.json").read_text())
    assert config["dtype"] == str(dtype).removeprefix("torch.")
    del config["dtype"]  # only the tensors tell
    (tmp_path / "unnamed" / "config.json").write_text(json.dumps(config))
    for directory in ("named", "unnamed"):
        assert pool2.run(_dtypes, str(tmp_path / directory)) == [[str(dtype)]] * 2
    assert pool2.run(_dtypes, str(tmp_path / "named"), dtype=torch.float32) == [["torch.float32"]] * 2
