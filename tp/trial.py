"""Try an inferred plan against the unsharded model before trusting it.

A trace cannot see everything: attention code that reshapes with a stored head count, a norm
over all heads' features, an ALiBi bias sized for every head. So ``tp.apply`` shards a copy of
the traced model (the model itself when small, else a tiny one of its type) on the real mesh,
runs one forward and backward next to the unsharded copy, and keeps a unit of the plan only if
logits and every gradient match. When the whole plan fails, each unit is tried alone to find
the ones at fault; those stay whole, and the report says why.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from .checks import sizes
from .checks.compare import (
    GRAD_RTOL,
    LOGITS_ATOL,
    for_checking,
    gradient_errors,
    logits_error,
    token_ids,
)
from .errors import PlanError
from .infer.plan import is_end_unit
from .plan.resolved import ResolvedPlan
from .resolve import resolve_units
from .shard import shard


@dataclass(frozen=True)
class TrialResult:
    ok: bool
    reason: str = ""


def trial_inputs(model: nn.Module):
    ids = token_ids(model, (2, 8), torch.Generator().manual_seed(1))
    return ids.to(model.get_input_embeddings().weight.device)


def _first_line(e: Exception) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:200]}"


def run_trial(twin: nn.Module, mesh: DeviceMesh, units: set[str], options: dict) -> TrialResult:
    """Shard a copy of ``twin`` with only ``units`` of its inferred plan and compare it with
    the unsharded copy (logits, every gradient)."""
    reference = for_checking(copy.deepcopy(twin).float())
    sharded = copy.deepcopy(reference)
    ids = trial_inputs(reference)
    try:
        shard(sharded, mesh, resolve_units(sharded, units=units, **options))
    except Exception as e:  # sizes that do not divide, a style that does not fit the module
        return TrialResult(False, _first_line(e))
    try:
        ref_out = reference(input_ids=ids, labels=ids)
        ref_out.loss.backward()
        out = sharded(input_ids=ids, labels=ids)
        out.loss.backward()
        errors = [(logits_error(out.logits, ref_out.logits), "the logits")]
        errors += [(error, f"the gradient of {name}") for name, error in gradient_errors(reference, sharded).items()]
    except Exception as e:  # a shape error inside the model's own forward: the unit does not fit
        return TrialResult(False, _first_line(e))
    # A wrong plan can leave "replicated" values different on each rank: decide together.
    worst = torch.tensor([e for e, _ in errors], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=mesh.get_group())
    limits = [LOGITS_ATOL] + [GRAD_RTOL] * (len(errors) - 1)
    for (value, what), limit in zip(zip(worst.tolist(), (w for _, w in errors)), limits):
        if not value <= limit:  # NaN fails too
            return TrialResult(False, f"{what} differs by {value:.1e}")
    return TrialResult(True)


def failing_units(twin: nn.Module, mesh: DeviceMesh, keys: list[str], options: dict) -> dict[str, str]:
    """Unit key -> why it fails; empty when the whole plan matches the unsharded model."""
    if run_trial(twin, mesh, set(keys), options).ok:
        return {}
    failing = {}
    for key in keys:
        result = run_trial(twin, mesh, {key}, options)
        if not result.ok:
            failing[key] = result.reason
    if not failing:  # each unit passes alone but not all together
        failing = {key: "fails only together with the other units" for key in keys}
    return failing


def fit(model: nn.Module, mesh: DeviceMesh, resolved: ResolvedPlan, options: dict, trial: bool) -> ResolvedPlan:
    """The inferred plan less its units whose sizes do not divide by the TP size and, with
    ``trial``, those that do not reproduce the unsharded model."""
    inference = resolved.inference
    options = {**options, "inference": inference}
    dropped = {key: f"at tp={mesh.size()}, {why}" for key, why in sizes.unit_problems(model, resolved, mesh.size()).items()}
    working = [key for key in resolved.units if key not in dropped]
    if not working:
        return resolved  # sizes.check refuses with every size that does not divide
    if trial:
        # the twin's logits are compared whole, so its trial gathers them
        failing = failing_units(inference.twin, mesh, working, {**options, "loss_parallel": False})
        if all(key in failing for key in working if not is_end_unit(key)):
            reasons = "; ".join(f"{key}: {why}" for key, why in failing.items())
            raise PlanError(
                f"{type(model).__name__}: no family in the registry recognises it, and no part of the plan inferred "
                f"from its dataflow matched the unsharded model when tried on {inference.traced} ({reasons}). Add a "
                "family to registry.toml (README: 'Contributing a family')")
        dropped.update({key: f"tried on {inference.traced}, {why}" for key, why in failing.items()})
    if not dropped:
        return resolved
    fitted = resolve_units(model, units={key for key in working if key not in dropped}, **options)
    fitted.warnings += [f"{key} stays whole: {why}" for key, why in dropped.items()]
    return fitted
