"""Execute a resolved plan: check sizes, shard with ``parallelize_module``, re-tie shared
weights and set the per-rank attributes. ``tp.apply`` and the trial of an inferred plan share it."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import parallelize_module

from .checks import report as report_
from .checks import sizes
from .errors import PlanError
from .plan.resolved import ResolvedPlan
from .sharding.heads import set_local_counts
from .sharding.ties import retie, tied_groups
from .sharding.whole import replicate_whole_parameters


def refuse_inconsistent(model: nn.Module, resolved: ResolvedPlan) -> None:
    """Raise PlanError listing where the plan's styles do not fit together, if anywhere."""
    if resolved.inconsistencies:
        raise PlanError(f"{type(model).__name__}: the plan is inconsistent:\n  " + "\n  ".join(resolved.inconsistencies))


def _listed_modules(model: nn.Module) -> list[str]:
    """Paths of the entries of every module list: the blocks a model may call on their own."""
    return [f"{path}.{i}" for path, m in model.named_modules() if isinstance(m, nn.ModuleList) for i in range(len(m))]


def shard(model: nn.Module, mesh: DeviceMesh, resolved: ResolvedPlan) -> report_.Report:
    """Shard ``model`` in place by ``resolved`` over the 1-D ``mesh``; returns the report."""
    tp = mesh.size()
    refuse_inconsistent(model, resolved)
    sizes.check(model, resolved, tp)
    report = report_.build(model, resolved, tp)
    ties = tied_groups(model)
    parallelize_module(model, mesh, resolved.styles(model))
    retie(model, ties, set(resolved.decisions))
    replicate_whole_parameters(model, mesh, _listed_modules(model))
    sizes.divide_attributes(model, resolved.divide, tp)
    if resolved.local_counts:
        set_local_counts(model, resolved.local_counts, resolved.heads, tp, mesh.get_local_rank())
    return report
