"""Random numbers under tensor parallelism: one seed on every rank, and a check that they agree.

Dropout on a tensor that every rank holds whole (GPT-2's embedding and residual dropout, any
dropout outside the sharded regions) must draw the same mask on every rank, or the ranks'
copies of the residual stream silently drift apart. Every rank draws the same mask when every
rank's generator is in the same state: seeded alike, and advanced by the same calls. The loss
does not show a drift (the logits are gathered, so every rank computes the same loss); these
two functions make it visible. See docs/dropout.md.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from .errors import TPError


class RandomStateError(TPError):
    """The ranks of a tensor-parallel mesh were seeded differently or their generators drifted apart."""


def _gather(value, mesh: DeviceMesh) -> list:
    group = mesh.get_group()
    values = [None] * dist.get_world_size(group)
    dist.all_gather_object(values, value, group=group)
    return values


def _ranks(mesh: DeviceMesh) -> list[int]:
    return dist.get_process_group_ranks(mesh.get_group())


def _generator_states(mesh: DeviceMesh) -> dict[str, torch.Tensor]:
    """The default CPU generator's state and, on an accelerator mesh, the current device's."""
    states = {"cpu": torch.get_rng_state()}
    if mesh.device_type != "cpu":
        module = torch.get_device_module(mesh.device_type)
        if hasattr(module, "get_rng_state"):
            states[mesh.device_type] = module.get_rng_state()
    return states


def seed(seed: int, mesh: DeviceMesh) -> None:
    """``torch.manual_seed(seed)`` on every rank of ``mesh``, after checking that all ranks passed
    the same seed (a collective: call it on every rank).

    Call it before building a randomly initialised model and before training. A seed that differs
    per rank (``seed + rank``, as data-parallel scripts often do) raises ``RandomStateError``:
    give data-parallel replicas different seeds, never the ranks of one tensor-parallel group.

    Example::
        >>> mesh = init_device_mesh("cpu", (2,))
        >>> tp.random.seed(1234, mesh)
    """
    seeds = _gather(int(seed), mesh)
    if len(set(seeds)) > 1:
        by_rank = ", ".join(f"rank {r}: {s}" for r, s in zip(_ranks(mesh), seeds))
        raise RandomStateError(
            f"tp.random.seed got different seeds on the ranks of one tensor-parallel mesh ({by_rank}); "
            "pass the same seed on every rank, or dropout outside the sharded regions draws different "
            "masks per rank and the replicated activations and parameters drift apart"
        )
    torch.manual_seed(seed)


def check_in_sync(mesh: DeviceMesh) -> None:
    """Raise ``RandomStateError`` unless every rank of ``mesh`` has the same generator state
    (CPU, and the mesh's device for an accelerator mesh). A collective: call it on every rank,
    e.g. after the first training step, or every N steps.

    Example::
        >>> loss.backward(); optimizer.step()
        >>> tp.random.check_in_sync(mesh)
    """
    digests = _gather({name: hashlib.sha256(state.cpu().numpy().tobytes()).hexdigest()
                       for name, state in _generator_states(mesh).items()}, mesh)
    ranks = _ranks(mesh)
    differ = [r for r, d in zip(ranks, digests) if d != digests[0]]
    if differ:
        generators = sorted({name for d in digests for name in d if d.get(name) != digests[0].get(name)})
        raise RandomStateError(
            f"the {', '.join(generators)} random generator state of rank(s) {differ} differs from rank "
            f"{ranks[0]}'s: dropout outside the sharded regions now draws different masks per rank. "
            "Seed every rank alike (tp.random.seed), and make the same random calls on every rank "
            "(docs/dropout.md lists what advances the generators differently)"
        )
