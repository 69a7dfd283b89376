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
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

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
    model_inputs,
    takes_token_ids,
    token_ids,
)
from .errors import PlanError
from .infer.inference import twin_of
from .infer.plan import is_end_unit
from .plan.resolved import ResolvedPlan
from .resolution import resolve_units
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


def run_trial(twin: nn.Module, mesh: DeviceMesh, units: set[str] | None, options: dict) -> TrialResult:
    """Shard a copy of ``twin`` with its plan (only ``units`` of an inferred one) and compare it
    with the unsharded copy (logits, every gradient)."""
    reference = for_checking(copy.deepcopy(twin).float())
    sharded = copy.deepcopy(reference)
    ids = trial_inputs(reference)
    try:
        shard(sharded, mesh, resolve_units(sharded, units=units, **options))
    except Exception as e:  # sizes that do not divide, a style that does not fit the module
        return TrialResult(False, _first_line(e))
    try:
        inputs = model_inputs(reference, ids)
        ref_out = reference(**inputs)
        ref_out.loss.backward()
        out = sharded(**inputs)
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
    if all(is_end_unit(key) for key in working):
        return resolved  # no block's unit is left: sizes.check refuses with every size that does not divide
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


CACHE_ENV = "TP_TRIAL_CACHE"  # where passed trials of family plans are remembered


def _cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tp" / "trials")


def _trial_key(model: nn.Module, resolved: ResolvedPlan, tp: int, traced: str) -> str:
    """What a passed trial depends on: the model class and the flags its twin keeps (``traced``
    names them), the transformers and torch releases, the TP size and the plan itself."""
    import transformers

    plan = sorted({(re.sub(r"\.\d+(?=\.|$)", ".*", path), str(d.style)) for path, d in resolved.decisions.items()})
    facts = [type(model).__qualname__, traced, transformers.__version__, torch.__version__, tp, resolved.family,
             plan, sorted(resolved.local_counts.items()), resolved.divide]
    return hashlib.sha256(json.dumps(facts, default=str).encode()).hexdigest()[:32]


def try_family_plan(model: nn.Module, mesh: DeviceMesh, resolved: ResolvedPlan, options: dict) -> str:
    """Shard a twin of ``model`` (itself when small, else a tiny model of its class with its
    config's flags) with the family's plan on ``mesh`` and compare it with the unsharded twin,
    unless the same trial passed before (a file in ``$TP_TRIAL_CACHE``, default
    ~/.cache/tp/trials). Raises PlanError when it fails; returns what was done, for the report."""
    found = twin_of(model)
    if found is None:
        return "not tried: no twin of this model can be built"
    twin, traced = found
    if not takes_token_ids(twin):
        return f"not tried: {type(twin).__name__} has no token embedding to feed; check it with tp.verify(model_factory=...)"
    path = _cache_dir() / f"{_trial_key(model, resolved, mesh.size(), traced)}.json"
    # every rank must take the same branch: the trial is collective
    cached = torch.tensor([int(path.is_file())])
    dist.all_reduce(cached, op=dist.ReduceOp.MIN, group=mesh.get_group())
    if cached.item():
        return f"passed on {traced} before (cached in {path.parent})"
    start = time.perf_counter()
    result = run_trial(twin, mesh, None, {**options, "loss_parallel": False})
    if not result.ok:
        raise PlanError(
            f"{type(model).__name__}: the plan of family {resolved.family!r} does not reproduce the unsharded model "
            f"when tried on {traced}: {result.reason}. The family may not fit this transformers release or these "
            "config flags; check it with `python -m tp verify`, or pass trial=False to shard without this check")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"traced": traced, "tp": mesh.size()}))
        temporary.replace(path)
    except OSError:  # a read-only home: the trial runs again next time
        pass
    return f"passed on {traced} in {time.perf_counter() - start:.1f} s"
