"""Lending a module's forward the local shards of its parameters, and taking them back.

Styles that run a module's own ``forward`` on local tensors (fused layouts, convolutions,
experts, per-head rows) swap each parameter for its local shard for the duration of one call:
nothing replaces ``forward``, and the Parameters the optimizer and checkpoints see stay put.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor

_LENT = "_tp_lent_params"  # the module's own parameters while its forward runs on local shards


def lend_local_params(module: nn.Module, names, local_fn) -> None:
    """Swap the parameters ``names`` for ``local_fn(name, param)`` until ``take_back_params``."""
    lent = {name: module._parameters[name] for name in names if module._parameters.get(name) is not None}
    module.__dict__[_LENT] = lent
    for name, param in lent.items():
        module._parameters[name] = local_fn(name, param)


def take_back_params(module: nn.Module) -> dict[str, nn.Parameter] | None:
    """Put the lent parameters back; returns them, or None if nothing was lent."""
    lent = module.__dict__.pop(_LENT, None)
    if lent is not None:
        module._parameters.update(lent)
    return lent


def lend_during_forward(module: nn.Module, lend: Callable[[], None], holders: Sequence[nn.Module] = ()) -> None:
    """Call ``lend()`` (which lends parameters with ``lend_local_params``) before each forward of
    ``module``, and give back the lent parameters of ``module`` and ``holders`` after it, even
    when the forward raises."""

    def take_back(mod, args, output):
        for holder in (module, *holders):
            take_back_params(holder)

    module.register_forward_pre_hook(lambda mod, args: lend())
    module.register_forward_hook(take_back, always_call=True)


def local_of(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param

