"""tp.apply: shard a model over a 1-D DeviceMesh with torch's parallelize_module."""

from __future__ import annotations

import os

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import parallelize_module

from . import overrides as overrides_
from . import plan as plan_
from . import report as report_
from . import sizes
from .errors import AlreadyShardedError, MeshError, PlanError
from .gather import is_sharded
from .heads import set_local_counts
from .registry import load_registry
from .styles import StyleSpec


def resolve(
    model: nn.Module,
    tp: int,
    *,
    family: str | None = None,
    allreduce: str | list[str] | None = None,
    keep: str | list[str] | None = None,
    config: str | os.PathLike | None = None,
    registry: str | os.PathLike | None = None,
    strict: bool = False,
    loss_parallel: bool = False,
    sequence_parallel: bool = False,
    _inference=None,
    _units: set[str] | None = None,
) -> plan_.ResolvedPlan:
    """The plan ``apply`` would use, without sharding anything (works on the meta device)."""
    reg = load_registry(registry)
    resolved = plan_.resolve(
        model, reg, family=family, overrides=overrides_.collect(allreduce, keep, config), strict=strict,
        inference=_inference, units=_units,
    )
    if loss_parallel:
        heads = [p for p, d in resolved.decisions.items() if d.style.name == "lm_head"]
        if not heads:
            raise PlanError("loss_parallel=True, but the plan has no module with the lm_head style")
        for path in heads:
            resolved.with_style(path, StyleSpec("lm_head", (("loss_parallel", True),)))
    if sequence_parallel:
        plan_.with_sequence_parallel(resolved, model, reg)
    return resolved


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


def _tied_groups(model: nn.Module) -> list[list[tuple[str, str]]]:
    """Groups of (module path, parameter name) that share one Parameter, such as tied embeddings."""
    owners: dict[int, list[tuple[str, str]]] = {}
    for path, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((path, name))
    return [group for group in owners.values() if len(group) > 1]


def _retie(model: nn.Module, groups: list[list[tuple[str, str]]], styled: set[str] = frozenset()) -> None:
    """parallelize_module replaces parameters one module at a time, which unties shared ones.

    A module the plan gives no style (BERT's prediction head holding its decoder's bias) takes
    the layout of the styled module it shares the parameter with; modules with styles must agree."""
    for group in groups:
        params = [getattr(model.get_submodule(path), name) for path, name in group]
        sharded = next((p for p in params if isinstance(p, DTensor)), params[0])
        layouts = {(tuple(p.placements) if isinstance(p, DTensor) else None)
                   for p, (path, _) in zip(params, group) if path in styled or isinstance(p, DTensor)}
        if len(layouts) > 1:
            where = ", ".join(f"{path}.{name}" for path, name in group)
            raise PlanError(f"tied parameters {where} got different layouts {layouts}; give their modules "
                            "styles that shard the shared weight the same way")
        for path, name in group:
            setattr(model.get_submodule(path), name, sharded)


def _fitted(model: nn.Module, mesh: DeviceMesh, resolved: plan_.ResolvedPlan, options: dict,
            loss_parallel: bool, trial: bool) -> plan_.ResolvedPlan:
    """The inferred plan less its units whose sizes do not divide by the TP size and, with
    ``trial``, those that do not reproduce the unsharded model (tp/trial.py)."""
    from .trial import failing_units

    inference = resolved.inference
    dropped = {key: f"at tp={mesh.size()}, {why}" for key, why in sizes.unit_problems(model, resolved, mesh.size()).items()}
    working = [key for key in resolved.units if key not in dropped]
    if not working:
        return resolved  # sizes.check refuses with every size that does not divide
    if trial:
        failing = failing_units(inference.twin, mesh, working, options)
        if all(key in failing for key in working if not plan_.is_end_unit(key)):
            reasons = "; ".join(f"{key}: {why}" for key, why in failing.items())
            raise PlanError(
                f"{type(model).__name__}: no family in the registry recognises it, and no part of the plan inferred "
                f"from its dataflow matched the unsharded model when tried on {inference.traced} ({reasons}). Add a "
                "family to registry.toml (README: 'Contributing a family')")
        dropped.update({key: f"tried on {inference.traced}, {why}" for key, why in failing.items()})
    if not dropped:
        return resolved
    working = {key for key in working if key not in dropped}
    fitted = resolve(model, mesh.size(), loss_parallel=loss_parallel, _inference=inference, _units=working, **options)
    fitted.warnings += [f"{key} stays whole: {why}" for key, why in dropped.items()]
    return fitted


def apply(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    family: str | None = None,
    allreduce: str | list[str] | None = None,
    keep: str | list[str] | None = None,
    config: str | os.PathLike | None = None,
    registry: str | os.PathLike | None = None,
    strict: bool = False,
    loss_parallel: bool = False,
    sequence_parallel: bool = False,
    trial: bool = True,
    _units: set[str] | None = None,
) -> report_.Report:
    """Shard ``model`` in place over the 1-D ``mesh`` and return a report of what was done.

    Args:
        model: an unsharded model, e.g. from ``AutoModelForCausalLM.from_config``.
        mesh: a 1-D DeviceMesh of the tensor-parallel ranks.
        family: registry family to use; default: recognised from the model.
        allreduce, keep: module-name patterns (a list or a comma-separated string) of linears
            to make row-parallel or to keep whole; they win over every other source.
        config: a TOML file with ``allreduce_linear_items`` / ``keep_linear_items``.
        registry: a user registry.toml merged over the built-in one.
        strict: a pattern that matches no module is an error instead of a warning.
        loss_parallel: keep the logits vocab-sharded for ``loss_parallel()``.
        sequence_parallel: shard the activations between blocks along the sequence (Megatron's
            sequence parallelism): norms run on sequence shards, each block gathers its input once
            and reduce-scatters its output. The model's hidden states between blocks are then
            sequence-sharded DTensors.
        trial: for a plan inferred from the traced dataflow (no registry family), first shard a
            copy of the traced model on ``mesh`` and keep only the parts of the plan that match
            the unsharded copy (tp/trial.py). Every rank must call ``apply`` with the same model.

    Example::
        >>> mesh = init_device_mesh("cpu", (2,))
        >>> report = tp.apply(AutoModelForCausalLM.from_config(cfg), mesh)
        >>> print(report)
    """
    tp = _check_mesh(mesh)
    _check_not_sharded(model)
    options = dict(allreduce=allreduce, keep=keep, config=config, registry=registry, strict=strict,
                   sequence_parallel=sequence_parallel)
    resolved = resolve(model, tp, family=family, loss_parallel=loss_parallel, _units=_units, **options)
    if resolved.inference is not None and _units is None:
        resolved = _fitted(model, mesh, resolved, options, loss_parallel, trial)
    sizes.check(model, resolved, tp)
    report = report_.build(model, resolved, tp)
    ties = _tied_groups(model)
    heads = resolved.heads
    parallelize_module(model, mesh, resolved.styles(model))
    _retie(model, ties, set(resolved.decisions))
    if resolved.local_counts:
        set_local_counts(model, resolved.local_counts, heads, tp)
    if resolved.family:
        reg = load_registry(registry)
        sizes.divide_attributes(model, reg.inherited(resolved.family, "divide"), tp)
        counts = reg.inherited(resolved.family, "local_heads")
        if counts and heads is None:
            raise PlanError(f"family {resolved.family!r} sets local_heads, but the model's config names no heads")
        if counts:
            set_local_counts(model, counts, heads, tp)
    return report
