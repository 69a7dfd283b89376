"""Lending a module's forward the local shards of its parameters, and taking them back.

Styles that run a module's own ``forward`` on local tensors (fused layouts, convolutions,
experts, per-head rows) swap each parameter for its local shard for the duration of one call:
nothing replaces ``forward``, and the Parameters the optimizer and checkpoints see stay put.

Lending nests: each lender (a style by default, or a scope that lends whole parameters, see
``tp.sharding.whole``) takes back only what it lent, inner lenders first, and a parameter already
lent is left to its first lender.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor

_LENT = "_tp_lent_params"  # lender -> the module's own parameters it lent, while they are lent
STYLE = "style"  # the lender of a style that lends a module's parameters to its own forward


def lend_local_params(module: nn.Module, names, local_fn, *, lender: Hashable = STYLE) -> None:
    """Swap the parameters ``names`` for ``local_fn(name, param)`` until ``take_back_params``.

    A name that holds a lent tensor (not a Parameter) is left as it is. One that holds a Parameter
    again although an outer lender lent it (FSDP2 put its unsharded parameter there) is lent anew.
    A name registered as None (a fused parameter stored in parts) is lent what ``local_fn(name,
    None)`` makes of it, unless that is None too."""
    mine = module.__dict__.setdefault(_LENT, {}).setdefault(lender, {})
    for name in names:
        if name in mine or name not in module._parameters:
            continue
        param = module._parameters[name]
        if isinstance(param, nn.Parameter) or param is None:
            local = local_fn(name, param)
            if param is not None or local is not None:
                mine[name] = param
                module._parameters[name] = local


def take_back_params(module: nn.Module, *, lender: Hashable = STYLE) -> dict[str, nn.Parameter] | None:
    """Put back the parameters ``lender`` lent; returns them, or None if it lent nothing."""
    lending = module.__dict__.get(_LENT)
    lent = lending.pop(lender, None) if lending is not None else None
    if lending is not None and not lending:
        del module.__dict__[_LENT]
    if lent is not None:
        module._parameters.update(lent)
    return lent


def lend_during_forward(module: nn.Module, lend: Callable[[], None], holders: Sequence[nn.Module] = (), *,
                        lender: Hashable = STYLE) -> None:
    """Call ``lend()`` (which lends parameters with ``lend_local_params``) before each forward of
    ``module``, and give back what ``lender`` lent of ``module`` and ``holders`` after it, even
    when the forward raises."""

    def take_back(mod, args, output):
        for holder in (module, *holders):
            take_back_params(holder, lender=lender)

    module.register_forward_pre_hook(lambda mod, args: lend())
    module.register_forward_hook(take_back, always_call=True)


def local_of(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param
