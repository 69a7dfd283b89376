"""Sequence parallelism: a tensor-parallel plan turned into one whose activations between blocks
are sharded along the sequence (Megatron's sequence parallelism)."""

from __future__ import annotations

from torch import nn

from ..errors import PlanError
from ..styles import StyleSpec
from ..styles.descriptor import Act
from .matching import best_match, report_unmatched
from .registry import Registry
from .resolved import Decision, ResolvedPlan
from .structure import SEQUENCE_DIM, find_blocks, is_norm

NORM = StyleSpec("sequence_parallel")
GATHERED_BLOCK = StyleSpec("sequence_block")
KEEP = StyleSpec("keep")


def sequence_stacks(model: nn.Module, plan: ResolvedPlan) -> list[str]:
    """Paths of the stacks of blocks whose residual stream is sharded along the sequence: the
    outermost lists of modules holding a style that takes a sequence dimension (a decoder's
    layers; an encoder-decoder's two stacks). A list inside one of them (T5's sub-layers) is part
    of its blocks."""
    lists = [path for path, module in model.named_modules() if isinstance(module, nn.ModuleList) and len(module)]
    holding = [path for path in lists if any(p.startswith(path + ".") and d.style.style.takes_sequence_dim
                                              for p, d in plan.decisions.items())]
    outermost = [path for path in holding if not any(path.startswith(other + ".") for other in holding)]
    # a plan that shards nothing inside the blocks (a trial of the embedding alone) keeps the stream
    # sharded through the blocks all the same
    blocks = find_blocks(model)
    return outermost or ([blocks[0].rpartition(".")[0]] if blocks else [])


def _residual_norms(modules: dict[str, nn.Module], plan: ResolvedPlan, stacks: list[str]) -> list[str]:
    """The norms on the residual stream: a stack's final norm (a child of the module holding the
    list), and the norms inside a block that no styled module between the block and the norm
    encloses (an attention's own q/k norms read features, not the stream)."""
    tops = {stack.rpartition(".")[0] for stack in stacks}
    found = []
    for path, module in modules.items():
        if not path or path in plan.decisions or not is_norm(module):
            continue
        parent = path.rpartition(".")[0]
        stack = next((s for s in stacks if path.startswith(s + ".")), None)
        if stack is None:
            if parent in tops:
                found.append(path)
            continue
        block = stack + "." + path[len(stack) + 1:].split(".")[0]
        between = [p for p in _enclosing(path) if p.startswith(block + ".")]
        if not any(p in plan.decisions for p in between):
            found.append(path)
    return found


def _enclosing(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _gathered_blocks(plan: ResolvedPlan) -> dict[str, str]:
    """Module -> the child that sees the tokens flattened (packed experts): each such module runs
    on the gathered sequence as one block, whatever its other children do with the tokens."""
    found = {}
    for path, decision in plan.decisions.items():
        if decision.style.style.flattens_sequence:
            parent = path.rpartition(".")[0]
            held = plan.decisions.get(parent)
            if held is not None and not held.style.style.shares_input:
                raise PlanError(f"sequence_parallel: {path} ({decision.style.name}) sees the tokens flattened, so its "
                                f"parent {parent} must gather the sequence for it, but the plan gives that module "
                                f"{held.style.name!r}; shard this model without sequence parallelism")
            found[parent] = path
    return found


def _only_whole_beside(block: str, flattening: str, plan: ResolvedPlan) -> bool:
    """Whether every other styled module in the block runs whole, leaving its activation as it
    read it (a router kept whole). Then the experts' output is the block's, and it may leave as
    partial sums for one reduce-scatter (Megatron's MoE). A sharded shared expert beside them
    all-reduces its own output, to which the block adds the experts': the experts then all-reduce
    theirs too, and the block cuts the complete sum along the sequence."""
    return all(d.style.style.output_layout(d.style.options) == Act.AS_READ
               for p, d in plan.decisions.items() if p.startswith(block + ".") and p != flattening)


def _whole_children(block: str, modules: dict[str, nn.Module], plan: ResolvedPlan) -> list[str]:
    """The children of a gathered block that hold parameters and no style, inside or below (a
    router the plan leaves whole): they compute on local tensors of the gathered input
    (``keep``), whose gradient is complete on every rank."""
    return [path for path, module in modules.items()
            if path.rpartition(".")[0] == block and path not in plan.decisions
            and any(True for _ in module.parameters())
            and not any(p.startswith(path + ".") for p in plan.decisions)]


def with_sequence_parallel(plan: ResolvedPlan, model: nn.Module, registry: Registry) -> None:
    """Turn a tensor-parallel plan into a sequence-parallel one, in place.

    Between blocks the residual stream is sharded along the sequence: the styles that take a
    ``sequence_dim`` get it (row-parallel outputs and the embedding are reduce-scattered instead
    of all-reduced, the lm_head gathers its input), each block input is all-gathered once
    (``block_input``), and the norms on the residual stream run on sequence shards. A module
    holding packed experts (which see the tokens flattened) runs on the gathered sequence
    (``sequence_block``: its input all-gathered once for the router and the experts, the experts'
    partial output reduce-scattered). An encoder-decoder's two stacks are each sharded; the
    decoder's ``block_input`` on the encoder output gathers it once for every cross-attention. A
    family's ``sequence_parallel`` table adds synchronisation points (``sequence_shard`` after a
    module) and norms.
    """
    refused = registry.inherited(plan.family, "sequence_parallel_refused") if plan.family else None
    if refused:
        raise PlanError(f"family {plan.family!r} cannot run sequence parallel: {refused}; shard it without it")
    for path, decision in plan.decisions.items():
        reason = decision.style.style.sequence_refused
        if reason:
            raise PlanError(f"sequence_parallel is not supported with style {decision.style.name!r} ({path}): "
                            f"{reason}; shard this model without it")
    stacks = sequence_stacks(model, plan)
    if not stacks:
        raise PlanError(f"{type(model).__name__}: sequence_parallel needs repeated blocks with a sequence "
                        "dimension whose outputs a row-parallel module syncs; none were found")
    gathered = _gathered_blocks(plan)
    partial = {block: _only_whole_beside(block, flattening, plan) for block, flattening in gathered.items()}
    for path, decision in list(plan.decisions.items()):
        block = next((b for b in gathered if path.startswith(b + ".")), None)
        if not decision.style.style.takes_sequence_dim:
            continue
        if block is None or (path == gathered[block] and partial[block]):
            plan.with_style(path, decision.style.with_args(sequence_dim=SEQUENCE_DIM))
    modules = dict(model.named_modules())
    for block in gathered:
        plan.decisions[block] = Decision(
            block, GATHERED_BLOCK.with_args(sequence_dim=SEQUENCE_DIM, partial_output=partial[block]),
            "derived (sequence parallel: its experts see the tokens flattened)")
        for path in _whole_children(block, modules, plan):
            plan.decisions[path] = Decision(path, KEEP, "derived (sequence parallel: reads the gathered sequence)")
    points = registry.inherited(plan.family, "sequence_parallel") if plan.family else {}
    where = f"family {plan.family!r} (sequence_parallel)"
    used = set()
    for path in modules:
        hit = best_match(path, points, where) if path else None
        if hit:
            used.add(hit[0])
            plan.decisions[path] = Decision(path, hit[1], f"family {plan.family} (sequence parallel)", hit[0])
    report_unmatched(points, used, list(modules), where, False, plan.warnings)
    # after the family's points: a norm inside a module the family styles (a block kept whole on the
    # gathered sequence) reads that module's input, not the stream
    for path in _residual_norms(modules, plan, stacks):
        plan.decisions[path] = Decision(path, NORM, "derived (sequence parallel)")
    order = {path: i for i, path in enumerate(modules)}
    plan.decisions = dict(sorted(plan.decisions.items(), key=lambda item: order[item[0]]))
