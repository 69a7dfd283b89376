"""Whole parameters as replicated DTensors, so that every parameter of a sharded model is a DTensor.

A parameter the plan keeps whole (a norm's weight, a router, a kept linear) is the same on every
rank. As a plain tensor beside the DTensors of the sharded ones, it breaks torch's utilities that
take all parameters at once: ``clip_grad_norm_`` and the foreach / fused optimizers refuse to mix
``torch.Tensor`` and ``DTensor``. As a ``Replicate()`` DTensor on the tensor-parallel mesh it is
counted once in a gradient norm, and checkpoints and FSDP2 see one kind of parameter.

The model still computes on plain local tensors: for the duration of a forward, the parameter's
local tensor is lent in its place (``tp.sharding.lending``), so there is no DTensor dispatch and
no communication, and its gradient comes back as a replicated DTensor (every rank computed the
same whole gradient). Some models read a parameter outside its owner's forward (LFM 3, DBRX and
Gemma 4 failed with only the owners lending, tests/test_inference_cases.py), so the lending
covers a scope: the whole model, each repeated block (a layer recomputed under gradient
checkpointing runs outside the model's forward) and each owning module (called on its own).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from .lending import lend_local_params, local_of, take_back_params
from .tags import is_sharded, replicated_parameter


def replicate_whole_parameters(model: nn.Module, mesh: DeviceMesh, blocks: list[str] = ()) -> list[str]:
    """Turn every plain, untagged parameter of ``model`` into a replicated DTensor on ``mesh``,
    lent as a local tensor during the forward of ``model``, of each of ``blocks`` (module paths)
    and of its owner. Shared parameters stay shared. Returns the names of the parameters turned."""
    replaced: dict[int, nn.Parameter] = {}
    owners: dict[str, tuple[nn.Module, tuple[str, ...]]] = {}
    for path, module in model.named_modules():
        names = []
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in replaced:
                if is_sharded(param):
                    continue
                replaced[id(param)] = replicated_parameter(param, mesh)
            module.register_parameter(name, replaced[id(param)])
            names.append(name)
        if names:
            owners[path] = (module, tuple(names))
    for scope in ("", *blocks, *owners):
        inside = [owner for path, owner in owners.items() if not scope or path == scope or path.startswith(scope + ".")]
        if inside:
            _lend_during_forward(model.get_submodule(scope), inside)
    return [f"{path}.{name}" if path else name for path, (_, names) in owners.items() for name in names]


def _lend_during_forward(scope: nn.Module, owners: list[tuple[nn.Module, tuple[str, ...]]]) -> None:
    lender = ("whole", id(scope))

    def lend(mod, args):
        for module, names in owners:
            lend_local_params(module, names, lambda name, param: local_of(param), lender=lender)

    def take_back(mod, args, output):
        for module, _ in owners:
            take_back_params(module, lender=lender)

    scope.register_forward_pre_hook(lend)
    scope.register_forward_hook(take_back, always_call=True)
