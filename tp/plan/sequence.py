"""Sequence parallelism: a tensor-parallel plan turned into one whose activations between blocks
are sharded along the sequence (Megatron's sequence parallelism)."""

from __future__ import annotations

from torch import nn

from ..errors import PlanError
from ..styles import StyleSpec
from .matching import best_match, report_unmatched
from .registry import Registry
from .resolved import Decision, ResolvedPlan
from .structure import SEQUENCE_DIM, find_blocks, is_norm

NORM = StyleSpec("sequence_parallel")


def with_sequence_parallel(plan: ResolvedPlan, model: nn.Module, registry: Registry) -> None:
    """Turn a tensor-parallel plan into a sequence-parallel one, in place.

    Between blocks the residual stream is sharded along the sequence: the styles that take a
    ``sequence_dim`` get it (row-parallel outputs and the embedding are reduce-scattered instead
    of all-reduced, the lm_head gathers its input), each block input is all-gathered once
    (``block_input``), and the norms of the blocks and the final norm run on sequence shards. A
    family's ``sequence_parallel`` table adds synchronisation points (``sequence_shard`` after a
    module) and norms.
    """
    blocks = find_blocks(model)
    if not blocks:
        raise PlanError(f"{type(model).__name__}: sequence_parallel needs repeated blocks with a sequence "
                        "dimension; none were found")
    refused = registry.inherited(plan.family, "sequence_parallel_refused") if plan.family else None
    if refused:
        raise PlanError(f"family {plan.family!r} cannot run sequence parallel: {refused}; shard it without it")
    for path, decision in plan.decisions.items():
        reason = decision.style.style.sequence_refused
        if reason:
            raise PlanError(f"sequence_parallel is not supported with style {decision.style.name!r} ({path}): "
                            f"{reason}; shard this model without it")
    top = blocks[0].rpartition(".")[0].rpartition(".")[0]  # "model" of "model.layers.3"
    for path, decision in list(plan.decisions.items()):
        if decision.style.style.takes_sequence_dim:
            plan.with_style(path, decision.style.with_args(sequence_dim=SEQUENCE_DIM))
    modules = dict(model.named_modules())
    for path, module in modules.items():
        parent = path.rpartition(".")[0]
        if path and path not in plan.decisions and is_norm(module) and (parent in blocks or parent == top):
            plan.decisions[path] = Decision(path, NORM, "derived (sequence parallel)")
    points = registry.inherited(plan.family, "sequence_parallel") if plan.family else {}
    where = f"family {plan.family!r} (sequence_parallel)"
    used = set()
    for path in modules:
        hit = best_match(path, points, where) if path else None
        if hit:
            used.add(hit[0])
            plan.decisions[path] = Decision(path, hit[1], f"family {plan.family} (sequence parallel)", hit[0])
    report_unmatched(points, used, list(modules), where, False, plan.warnings)
    order = {path: i for i, path in enumerate(modules)}
    plan.decisions = dict(sorted(plan.decisions.items(), key=lambda item: order[item[0]]))
