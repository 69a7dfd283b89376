"""Resolve the complete plan for a model: which module gets which style and which source
decided it, the heads each module sees, and the attributes to set per rank.

Sources, highest precedence first: ``argument``, ``environment``, ``config file``, the
family plan from the registry, then, for a model with no registered family, the plan inferred
from its traced dataflow (or its module names). Block inputs are ``derived`` last.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import replace
from typing import TypedDict, Unpack

from torch import nn

from .checks import consistency
from .errors import PlanError
from .infer.inference import Inference, trace
from .infer.plan import infer_from_dataflow, infer_plan_from_names
from .plan import overrides as overrides_
from .plan.family import apply_overrides, derive_block_inputs, family_decisions
from .plan.registry import load_registry
from .plan.resolved import Decision, ResolvedPlan
from .plan.sequence import with_sequence_parallel
from .sharding.heads import heads_of


class PlanOptions(TypedDict, total=False):
    """The options ``tp.apply``, ``tp.resolve`` and ``tp.verify`` take.

    family: registry family to use; default: recognised from the model.
    allreduce, keep: module-name patterns (a list or a comma-separated string) of linears to make
        row-parallel or to keep whole; they win over every other source.
    config: a TOML file with ``allreduce_linear_items`` / ``keep_linear_items``.
    registry: a user registry.toml merged over the built-in one.
    strict: a pattern that matches no module is an error instead of a warning.
    loss_parallel: keep the logits vocab-sharded for ``loss_parallel()``.
    sequence_parallel: shard the activations between blocks along the sequence (Megatron's
        sequence parallelism): norms run on sequence shards, each block gathers its input once
        and reduce-scatters its output.
    fix_overrides: where an override keeps one linear of a column-parallel group whole
        (``keep="k_proj"``), keep its whole unit (q, k, v and o of that attention) instead of
        refusing the plan; the plan's warnings say what was kept.
    """

    family: str | None
    allreduce: str | list[str] | None
    keep: str | list[str] | None
    config: str | os.PathLike | None
    registry: str | os.PathLike | None
    strict: bool
    loss_parallel: bool
    sequence_parallel: bool
    fix_overrides: bool


def resolve(model: nn.Module, tp: int, **options: Unpack[PlanOptions]) -> ResolvedPlan:
    """The plan ``tp.apply`` would use, without sharding anything (works on the meta device).

    Example::
        >>> plan = tp.resolve(AutoModelForCausalLM.from_config(cfg), 2, keep="o_proj")
        >>> plan.decisions["model.layers.0.self_attn.o_proj"].style
        StyleSpec(name='keep', args=())
    """
    return resolve_units(model, **options)


def resolve_units(model: nn.Module, *, family: str | None = None, allreduce=None, keep=None, config=None,
                  registry=None, strict: bool = False, loss_parallel: bool = False, sequence_parallel: bool = False,
                  fix_overrides: bool = False, inference: Inference | None = None, units: set[str] | None = None,
                  whole_units: dict[str, Decision] | None = None) -> ResolvedPlan:
    """``resolve``, where an inferred plan may reuse an earlier trace (``inference``) and keep only
    the unit keys ``units`` (the trial tries units one by one); ``whole_units`` are the decisions
    ``fix_overrides`` adds over the overrides."""
    reg = load_registry(registry)
    if family is None:
        family = reg.family_of(model)
    else:
        reg.get(family)  # raises, naming the known families
    problems: list[str] = []
    inferred = None
    if family is not None:
        decisions = family_decisions(model, reg, family, strict, problems)
    else:
        decisions = {}
        inferred = infer_from_dataflow(model, reg, decisions, problems, inference, units)
        if inferred is None:
            decisions = infer_plan_from_names(model, reg)
            problems.append("the plan was inferred from module names only (the model has no token embedding "
                            "to trace it with); check it with tp.verify(model_factory=...)")
            warnings.warn(problems[-1], stacklevel=3)
    overrides = overrides_.collect(allreduce, keep, config)
    apply_overrides(model, decisions, overrides, strict, problems)
    decisions.update(whole_units or {})
    modules = dict(model.named_modules())
    for path, decision in decisions.items():
        decision.style.check_module(path, modules[path])
    derive_block_inputs(model, decisions, reg, family)

    heads = heads_of(getattr(model, "config", None), reg.inherited(family, "heads") if family else None)
    ordered = {p: _with_heads(decisions[p], heads, model) for p in modules if p in decisions}
    resolved = ResolvedPlan(family, ordered, problems, heads)
    if inferred is not None:
        resolved.inference, resolved.local_counts, resolved.units = inferred
    if family is not None:
        resolved.local_counts = dict(reg.inherited(family, "local_heads"))
        resolved.divide = list(reg.inherited(family, "divide"))
        if resolved.local_counts and heads is None:
            raise PlanError(f"family {family!r} sets local_heads, but the model's config names no heads")
    # a plan tried unit by unit was checked whole first, but its units need the same fixes
    if units is None or (fix_overrides and whole_units is None):
        found = _inconsistencies(model, resolved, {o.source for o in overrides})
        fixed, notes = consistency.fixes(found)
        if fix_overrides and fixed and whole_units is None:  # resolved again, for the block inputs
            again = resolve_units(model, family=family, allreduce=allreduce, keep=keep, config=config,
                                  registry=registry, strict=strict, loss_parallel=loss_parallel,
                                  sequence_parallel=sequence_parallel, fix_overrides=True, inference=inference,
                                  units=units, whole_units=fixed)
            for note in notes if units is None else ():  # a unit's trial would say it again
                warnings.warn(note, stacklevel=3)
            again.warnings += notes
            return again
        if units is None:
            resolved.inconsistencies = consistency.messages(found)
    if loss_parallel:
        _with_loss_parallel(resolved)
    if sequence_parallel:
        with_sequence_parallel(resolved, model, reg)
    return resolved


def _inconsistencies(model: nn.Module, resolved: ResolvedPlan, overrides: set[str]) -> list[consistency.Problem]:
    """Where the plan's styles do not fit together (tp/checks/consistency.py); ``tp.apply`` refuses
    such a plan, ``tp plan`` shows it."""
    try:
        found = trace(model)
    except Exception:  # no twin of this type builds: tp verify (or the trial of an inferred plan) checks it
        return []
    if found is None or found.error:
        return []
    return consistency.problems(model, resolved, found, overrides)


def _with_heads(decision: Decision, heads, model: nn.Module) -> Decision:
    """The heads as the decision's module sees them: its parent's own head size, if any."""
    if heads is None or "." not in decision.module:
        return replace(decision, heads=heads)
    return replace(decision, heads=heads.at(model.get_submodule(decision.module.rpartition(".")[0])))


def _with_loss_parallel(resolved: ResolvedPlan) -> None:
    heads = [p for p, d in resolved.decisions.items() if "loss_parallel" in d.style.style.args.model_fields]
    if not heads:
        raise PlanError("loss_parallel=True, but the plan has no module whose style keeps the logits sharded "
                        "(lm_head)")
    for path in heads:
        resolved.with_style(path, resolved.decisions[path].style.with_args(loss_parallel=True))
