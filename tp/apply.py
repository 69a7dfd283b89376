"""tp.apply: shard a model over a 1-D DeviceMesh with torch's parallelize_module."""

from __future__ import annotations

from typing import Unpack

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from .checks.report import Report
from .errors import AlreadyShardedError, MeshError
from .plan.versions import warn_if_untested
from .resolve import PlanOptions, resolve
from .shard import shard
from .sharding.tags import is_sharded
from .trial import fit


def _check_mesh(mesh: DeviceMesh) -> int:
    if not isinstance(mesh, DeviceMesh):
        raise MeshError(f"tp.apply needs a torch DeviceMesh, got {type(mesh).__name__}; "
                        "build one with init_device_mesh('cpu' or 'cuda', (tp_size,))")
    if mesh.ndim != 1:
        names = mesh.mesh_dim_names or tuple(range(mesh.ndim))
        raise MeshError(
            f"tp.apply needs a 1-D mesh, got a {mesh.ndim}-D mesh with dims {names} and shape "
            f"{tuple(mesh.shape)}; pass the tensor-parallel dimension, e.g. mesh['tp']"
        )
    return mesh.size()


def _check_not_sharded(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        if is_sharded(param):
            raise AlreadyShardedError(
                f"{type(model).__name__} is already sharded (parameter {name} is sharded); "
                "tp.apply takes an unsharded model: build or load a fresh one"
            )


def apply(model: nn.Module, mesh: DeviceMesh, *, trial: bool = True, **options: Unpack[PlanOptions]) -> Report:
    """Shard ``model`` in place over the 1-D ``mesh`` and return a report of what was done.

    Args:
        model: an unsharded model, e.g. from ``AutoModelForCausalLM.from_config``.
        mesh: a 1-D DeviceMesh of the tensor-parallel ranks.
        trial: for a plan inferred from the traced dataflow (no registry family), first shard a
            copy of the traced model on ``mesh`` and keep only the parts of the plan that match
            the unsharded copy (tp/trial.py). Every rank must call ``apply`` with the same model.
        options: ``family``, ``allreduce``, ``keep``, ``config``, ``registry``, ``strict``,
            ``loss_parallel``, ``sequence_parallel`` (``tp.resolve.PlanOptions`` says what each does).
            With sequence parallelism the model's hidden states between blocks are
            sequence-sharded DTensors.

    Example::
        >>> mesh = init_device_mesh("cpu", (2,))
        >>> report = tp.apply(AutoModelForCausalLM.from_config(cfg), mesh)
        >>> print(report)
    """
    tp = _check_mesh(mesh)
    _check_not_sharded(model)
    warn_if_untested()
    resolved = resolve(model, tp, **options)
    if resolved.inference is not None:
        resolved = fit(model, mesh, resolved, dict(options), trial)
    return shard(model, mesh, resolved)
