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

from .gather import full_tensor
from .models import for_checking, token_ids
from .verification import GRAD_RTOL, GRAD_SCALE_FLOOR, LOGITS_ATOL, _max_rel


@dataclass(frozen=True)
class TrialResult:
    ok: bool
    reason: str = ""


def _inputs(model: nn.Module):
    ids = token_ids(model, (2, 8), torch.Generator().manual_seed(1))
    return ids.to(model.get_input_embeddings().weight.device)


def _largest(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def _errors(reference: nn.Module, sharded: nn.Module, ref_logits, logits) -> list[tuple[float, str]]:
    """(error, what) for the logits (absolute) and every gradient (relative to its largest entry)."""
    found = [((full_tensor(logits) - ref_logits).abs().max().item(), "the logits")]
    grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    floor = GRAD_SCALE_FLOOR * max((_largest(g) for g in grads.values()), default=0.0)
    for name, param in sharded.named_parameters():
        if name not in grads:
            continue
        if param.grad is None:
            found.append((float("inf"), f"the gradient of {name} (missing)"))
            continue
        found.append((_max_rel(full_tensor(param.grad, like=param), grads[name], floor), f"the gradient of {name}"))
    return found


def run_trial(twin: nn.Module, mesh: DeviceMesh, units: set[str], apply_kwargs: dict) -> TrialResult:
    """Shard a copy of ``twin`` with only ``units`` of its inferred plan and compare it with
    the unsharded copy (logits, every gradient)."""
    from .apply import apply

    reference = for_checking(copy.deepcopy(twin).float())
    sharded = copy.deepcopy(reference)
    ids = _inputs(reference)
    try:
        apply(sharded, mesh, _units=units, trial=False, **apply_kwargs)
    except Exception as e:  # sizes that do not divide, a style that does not fit the module
        return TrialResult(False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    try:
        ref_out = reference(input_ids=ids, labels=ids)
        ref_out.loss.backward()
        out = sharded(input_ids=ids, labels=ids)
        out.loss.backward()
        errors = _errors(reference, sharded, ref_out.logits, out.logits)
    except Exception as e:  # a shape error inside the model's own forward: the unit does not fit
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return TrialResult(False, f"{type(e).__name__}: {first[:200]}")
    # A wrong plan can leave "replicated" values different on each rank: decide together.
    worst = torch.tensor([e for e, _ in errors], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=mesh.get_group())
    limits = [LOGITS_ATOL] + [GRAD_RTOL] * (len(errors) - 1)
    for (value, what), limit in zip(zip(worst.tolist(), (w for _, w in errors)), limits):
        if not value <= limit:  # NaN fails too
            return TrialResult(False, f"{what} differs by {value:.1e}")
    return TrialResult(True)


def failing_units(twin: nn.Module, mesh: DeviceMesh, keys: list[str], apply_kwargs: dict) -> dict[str, str]:
    """Unit key -> why it fails; empty when the whole plan matches the unsharded model."""
    if run_trial(twin, mesh, set(keys), apply_kwargs).ok:
        return {}
    failing = {}
    for key in keys:
        result = run_trial(twin, mesh, {key}, apply_kwargs)
        if not result.ok:
            failing[key] = result.reason
    if not failing:  # each unit passes alone but not all together
        failing = {key: "fails only together with the other units" for key in keys}
    return failing
