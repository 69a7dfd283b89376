"""tp.apply: shard a model over a 1-D DeviceMesh with torch's parallelize_module."""

from __future__ import annotations

import warnings
from typing import Unpack

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from .checks import sizes
from .checks.report import Report
from .errors import AlreadyShardedError, MeshError
from .plan.versions import warn_if_untested
from .resolution import PlanOptions, resolve
from .shard import refuse_inconsistent, shard
from .sharding.tags import is_sharded
from .trial import fit, try_family_plan


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
        trial: first shard a twin of the model (the model itself when small, else a tiny model of
            its class with its config's flags) on ``mesh`` and compare it with the unsharded twin
            (tp/trial.py). A family's plan that fails is refused; a plan inferred from the traced
            dataflow keeps only its units that pass. A passed family trial is remembered on disk
            (``$TP_TRIAL_CACHE``). Every rank must call ``apply`` with the same model.
        options: ``family``, ``allreduce``, ``keep``, ``config``, ``registry``, ``strict``,
            ``loss_parallel``, ``sequence_parallel``, ``fix_overrides`` (``tp.resolution.PlanOptions``
            says what each does).
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
    refuse_inconsistent(model, resolved)  # before any trial: it would only fail on the same grounds
    tried = ""
    if not trial:
        warnings.warn("trial=False: the plan is not tried on a twin of the model against the unsharded twin, so a "
                      "plan that does not fit this model's code (another transformers release, a config flag) would "
                      "shard it silently wrong; check it with tp.verify", stacklevel=2)
    if resolved.inference is not None:
        resolved = fit(model, mesh, resolved, dict(options), trial)
    elif trial:
        # sizes first: the trial's tiny twin has other sizes, and would refuse them less clearly or not at all
        sizes.check(model, resolved, tp)
        tried = try_family_plan(model, mesh, resolved, dict(options))
    report = shard(model, mesh, resolved)
    report.trial = tried
    return report
