"""torch's own DCP calls on a tp-sharded model, run on every rank of a pool, for tests that a
checkpoint saved at one TP size loads at another bit for bit, with no tp call in between.

Example::
    >>> make = functools.partial(tiny_model, "phi3")
    >>> pool2.run(save, make, path)                                   # at TP=2
    >>> pool4.run(mismatches, functools.partial(tiny_model, "phi3", seed=1), make, path)
    [[], [], [], []]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh


def _sharded(make_model: Callable[[], nn.Module]) -> nn.Module:
    import tp

    model = make_model()
    tp.apply(model, init_device_mesh("cpu", (dist.get_world_size(),)))
    return model


def save(make_model: Callable[[], nn.Module], path: str) -> None:
    """``make_model()`` sharded over every rank, saved with ``get_state_dict`` and ``dcp.save``."""
    dcp.save(get_state_dict(_sharded(make_model), ())[0], checkpoint_id=path)


def mismatches(make_other: Callable[[], nn.Module], make_saved: Callable[[], nn.Module], path: str) -> list[str]:
    """Load ``path`` with ``dcp.load`` and ``set_state_dict`` into ``make_other()`` sharded over every
    rank (other values, so that a tensor the load missed shows); the names of the tensors that do
    not equal ``make_saved()``'s, gathered whole."""
    import tp

    model = _sharded(make_other)
    state, _ = get_state_dict(model, ())
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, (), model_state_dict=state, optim_state_dict={})
    full, saved = tp.full_state_dict(model), make_saved().state_dict()
    if set(full) != set(saved):
        return sorted(set(full) ^ set(saved))
    return [name for name, value in saved.items() if not torch.equal(full[name], value)]
