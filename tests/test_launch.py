"""The worker pool reports the rank that failed, quickly, even when the others wait for it in a
collective (tp/testing/launch.py)."""

import time

import pytest
import torch
import torch.distributed as dist

import tp
from tp.testing.launch import WorkerError


def _rank() -> int:
    return dist.get_rank()


def _rank_1_raises_before_all_reduce() -> None:
    if dist.get_rank() == 1:
        raise ValueError("rank 1 has no input")
    dist.all_reduce(torch.ones(1))  # rank 0 waits here for a rank that never comes


def _every_rank_refuses() -> None:
    raise tp.PlanError("no family 'lama' in the registry")


def test_the_failing_ranks_own_error_comes_within_seconds_and_the_pool_restarts(pool2):
    assert pool2.run(_rank) == [0, 1]  # started: what follows times the failure only
    began = time.monotonic()
    with pytest.raises(WorkerError) as err:
        pool2.run(_rank_1_raises_before_all_reduce)
    took = time.monotonic() - began
    assert took < 20, f"{took:.0f}s: the gloo timeout of the waiting rank, not the failure"
    assert str(err.value).startswith("rank 1: ValueError: rank 1 has no input")
    assert (err.value.remote_type, err.value.rank) == ("ValueError", 1)
    assert "rank 0 did not report" in str(err.value)
    assert pool2.run(_rank) == [0, 1]  # a fresh process group: the stuck rank was stopped


def test_a_refusal_on_every_rank_is_raised_as_is_and_keeps_the_pool(pool2):
    before = [p.pid for p in pool2._procs] if pool2._procs else None
    with pytest.raises(tp.PlanError, match="no family 'lama'"):
        pool2.run(_every_rank_refuses)
    after = [p.pid for p in pool2._procs]
    assert before is None or before == after
    assert pool2.run(_rank) == [0, 1]
