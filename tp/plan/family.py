"""The pieces of a plan that the registry and the overrides decide: a family's entries, the
ALLREDUCE/KEEP lists over them, and the shared block inputs derived from the result."""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from ..errors import PlanError
from ..patterns import matches
from ..styles import StyleSpec
from ..styles.linear import LINEAR_TYPES
from .matching import best_match, report_unmatched
from .overrides import Overrides
from .registry import Registry
from .resolved import Decision
from .structure import find_blocks

ROWWISE = StyleSpec("rowwise")
KEEP = StyleSpec("keep")
BLOCK_INPUT = StyleSpec("block_input")


def family_decisions(model: nn.Module, registry: Registry, family: str, strict: bool,
                     problems: list[str]) -> dict[str, Decision]:
    """Every module the family's plan matches, with the most specific matching entry."""
    plan = registry.plan(family, model)
    where = f"family {family!r}"
    if not plan:
        raise PlanError(f"{where} has an empty plan, so nothing would be sharded; give it a [families.{family}.plan] "
                        "table, or leave the family out so that the plan is inferred")
    paths = [p for p, _ in model.named_modules() if p]
    decisions, used = {}, set()
    for path in paths:
        hit = best_match(path, plan, where)
        if hit:
            used.add(hit[0])
            decisions[path] = Decision(path, hit[1], f"family {family}", hit[0])
    report_unmatched(plan, used, paths, where, strict, problems)
    return decisions


def apply_overrides(model: nn.Module, decisions: dict[str, Decision], overrides: list[Overrides], strict: bool,
                    problems: list[str]) -> None:
    """Set the linears the ALLREDUCE/KEEP lists name, in place; the first source wins."""
    linears = [p for p, m in model.named_modules() if p and isinstance(m, LINEAR_TYPES)]
    for source in reversed(list(overrides)):
        chosen: dict[str, tuple[str, StyleSpec]] = {}
        used = set()
        for style, patterns in ((ROWWISE, source.allreduce), (KEEP, source.keep)):
            for pattern in patterns:
                for path in (p for p in linears if matches(pattern, p)):
                    used.add(pattern)
                    if path in chosen and chosen[path][1] != style:
                        raise PlanError(
                            f"{source.source}: linear {path} is listed both as all-reduce ({chosen[path][0]!r}) "
                            f"and as keep ({pattern!r}); remove it from one of the lists"
                        )
                    chosen[path] = (pattern, style)
        for path, (pattern, style) in chosen.items():
            decisions[path] = Decision(path, style, source.source, pattern)
        report_unmatched(source.allreduce + source.keep, used, linears, f"{source.source} (linears only)",
                         strict, problems)


def derive_block_inputs(model: nn.Module, decisions: dict[str, Decision], registry: Registry,
                        family: str | None) -> None:
    """Give each module whose column-parallel linears share one input a ``block_input``, in place:
    the family's ``block_inputs`` patterns, else the parents of the linears whose style opens a
    block. A repeated block itself adds its input to the residual stream, which must stay a
    plain tensor, so it never gets one."""
    paths = [p for p, _ in model.named_modules()]
    patterns = registry.inherited(family, "block_inputs") if family else None
    if patterns is None:
        blocks = {p.rpartition(".")[0] for p, d in decisions.items()
                  if d.style.style.opens_block(d.style.options)} - set(find_blocks(model))
    else:
        blocks = {p for p in paths if any(matches(b, p) for b in patterns)}
    order = {path: i for i, path in enumerate(paths)}
    for block in sorted(blocks - {""} - set(decisions), key=order.__getitem__):
        decisions[block] = Decision(block, BLOCK_INPUT, "derived")
    _keep_dtensor_block_inputs(decisions)


def _keep_dtensor_block_inputs(decisions: dict[str, Decision]) -> None:
    """A block input stays a DTensor, even where it needs no gradient, when a module inside its
    block computes on DTensors: a plain input there would meet them (``dtensor_always``)."""
    for block, decision in list(decisions.items()):
        if not decision.style.style.shares_input:
            continue
        inside = (d for path, d in decisions.items() if path.startswith(f"{block}.") or not block)
        if any(d.style.style.computes_on_dtensors(d.style.options) for d in inside):
            decisions[block] = replace(decision, style=decision.style.with_args(dtensor_always=True))
