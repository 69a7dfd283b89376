"""A plan's consistency, checked before anything is sharded, by following the activation layouts
each style declares (``Style.reads`` / ``Style.leaves``) along the traced dataflow of every block
structure.

Inside a block, a linear's input is whole (the residual stream, or the output of a linear kept
whole or row-parallel) or sharded on features (the output of a column-parallel linear). A plan
is inconsistent where:

- a linear that expects sharded features (row-parallel) reads only whole ones;
- a linear that expects whole features (kept, column-parallel, or left out of the plan) reads
  a column-parallel linear's sharded output;
- a sharded output reaches the residual stream without a row-parallel linear in between;
- an override keeps one linear of a column-parallel group whole (``KEEP_LINEAR_ITEMS=k_proj``):
  its output would meet its siblings' sharded heads with all of its own heads;
- outside the blocks, a linear expects sharded features (the activations there are whole).

Each problem names the module, the source that decided its style and what would fix it. Every
block is checked (an override may name one layer), but a problem is told once per block structure.
Where an override keeps one linear of a column-parallel group whole, the fix is obvious: keep the
whole unit. ``fixes`` gives those decisions; ``tp.resolve(..., fix_overrides=True)`` applies them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import PlanError
from ..infer.dataflow import STREAM, BlockFlow, block_signature
from ..infer.inference import Trace
from ..plan.family import KEEP
from ..plan.resolved import Decision, ResolvedPlan
from ..plan.structure import find_blocks
from ..styles import Act
from ..styles.linear import LINEAR_TYPES
from .sizes import layouts


FIX_ARGUMENT = "fix_overrides=True"
FIX_OPTION = f"{FIX_ARGUMENT} (--fix-overrides)"


@dataclass(frozen=True)
class Problem:
    """One place where the plan's styles do not fit together.

    ``unit`` is set where an override keeps one linear (``cause``) of a column-parallel group whole:
    the group and its consumers, relative to ``block``, which keeping whole too would fix it.

    Example::
        >>> found = problems(model, resolved, trace(model), {"argument"})
        >>> found[0].unit   # keep="k_proj" on a llama
        ('self_attn.k_proj', 'self_attn.o_proj', 'self_attn.q_proj', 'self_attn.v_proj')
    """

    message: str
    block: str = ""
    unit: tuple[str, ...] = ()
    cause: Decision | None = None


def _describe(path: str, decision: Decision | None) -> str:
    if decision is None:
        return f"{path} (whole: not in the plan)"
    pattern = f" {decision.pattern!r}" if decision.pattern else ""
    return f"{path} ({decision.style}, from {decision.source}{pattern})"


def _laid_out_by_parent(model: nn.Module, resolved: ResolvedPlan) -> dict[str, str]:
    """Module -> the parent whose style lays out its parameters (a Mamba mixer's in_proj -> the mixer)."""
    found = {}
    for path, decision in resolved.decisions.items():
        try:
            laid = layouts(decision, model.get_submodule(path)) or {}
        except PlanError:  # a layout that does not fit its module: the size check names it
            continue
        for name in laid:
            child = name.rpartition(".")[0]
            if child:
                found[f"{path}.{child}"] = path
    return found


def _layouts_of(decision: Decision | None) -> tuple[Act, Act]:
    if decision is None:
        return Act.REPLICATED, Act.AS_READ
    style, options = decision.style.style, decision.style.options
    return style.input_layout(options), style.output_layout(options)


def _block_problems(block: str, flow: BlockFlow, decisions: dict[str, Decision], laid_out: dict[str, str],
                    overrides: set[str]) -> list[Problem]:
    leaves: dict[str, Act | None] = {}  # node -> its output's layout; None where a parent decides
    found: list[Problem] = []
    for rel, node in flow.nodes.items():
        path = f"{block}.{rel}"
        if path in laid_out:
            leaves[rel] = None
            continue
        decision = decisions.get(path)
        reads, left = _layouts_of(decision)
        producers = sorted(label[5:] for label in node.inputs if label.startswith("node:"))
        if any(leaves.get(p, Act.REPLICATED) is None for p in producers):
            leaves[rel] = None  # fed by a module a parent's style shards: that style answers for it
            continue
        sharded = [p for p in producers if leaves.get(p) is Act.FEATURES]
        here = _describe(path, decision)
        if reads is Act.FEATURES and not sharded:
            source = "the residual stream" if STREAM in node.inputs and not producers else \
                ", ".join(f"{block}.{p}" for p in producers) or "whole activations"
            found.append(Problem(f"{here} is row-parallel but reads whole features from {source}; make the "
                                 "linears that feed it column-parallel, or keep it whole", block))
        elif reads is Act.REPLICATED and sharded:
            found.append(Problem(f"{here} reads sharded features from {', '.join(f'{block}.{p}' for p in sharded)} "
                                 "(column-parallel); make it row-parallel, or keep those linears whole too", block))
        leaves[rel] = (Act.FEATURES if sharded else Act.REPLICATED) if left is Act.AS_READ else left
        if rel in flow.feeds_stream and leaves[rel] is Act.FEATURES:
            found.append(Problem(f"{here} brings sharded features to the residual stream; make the linear that "
                                 "writes to the stream row-parallel", block))
    for rel, node in flow.nodes.items():
        decision = decisions.get(f"{block}.{rel}")
        if decision is None or decision.source not in overrides or _layouts_of(decision) != (Act.REPLICATED, Act.AS_READ):
            continue  # only a linear an override keeps whole
        consumers = flow.readers(rel)
        siblings = [s for s, other in flow.nodes.items() if s != rel and other.inputs == node.inputs
                    and leaves.get(s) is Act.FEATURES and flow.readers(s) & consumers]
        if siblings:
            unit = tuple(sorted({rel, *siblings, *consumers}))
            found.append(Problem(
                f"{_describe(f'{block}.{rel}', decision)} stays whole, but {', '.join(siblings)} beside it "
                f"{'is' if len(siblings) == 1 else 'are'} column-parallel and their outputs meet in "
                f"{', '.join(sorted(consumers))}: its heads would not match theirs; keep the whole unit "
                f"({', '.join(unit)}) or none of it ({FIX_OPTION} keeps the whole unit)", block, unit, decision))
    return found


def problems(model: nn.Module, resolved: ResolvedPlan, trace: Trace, overrides: set[str]) -> list[Problem]:
    """Where the plan is inconsistent, in every block; ``overrides`` names the sources that are
    user overrides. ``messages`` tells them once per block structure."""
    blocks = find_blocks(model)
    laid_out = _laid_out_by_parent(model, resolved)
    found = []
    for block in blocks:
        flow = trace.flows.get(block_signature(model.get_submodule(block)))
        if flow is not None:
            found += _block_problems(block, flow, resolved.decisions, laid_out, overrides)
    # every module list's entries are blocks here (an encoder's layers beside the decoder's)
    listed = [f"{p}.{i}" for p, m in model.named_modules() if isinstance(m, nn.ModuleList) for i in range(len(m))]
    for path, decision in resolved.decisions.items():
        parent = laid_out.get(path)
        if parent is not None:  # an override naming a module its parent's style shards (a Mamba mixer's x_proj)
            found.append(_restyled_child(path, decision, parent, resolved.decisions, listed, overrides))
            continue
        inside = any(path.startswith(b + ".") for b in listed)
        if not inside and isinstance(model.get_submodule(path), LINEAR_TYPES) \
                and _layouts_of(decision)[0] is Act.FEATURES:
            found.append(Problem(f"{_describe(path, decision)} is row-parallel, but outside the repeated blocks its "
                                 "input is whole; give it the lm_head style, or keep it whole"))
    return found


def _restyled_child(path: str, decision: Decision, parent: str, decisions: dict[str, Decision], listed: list[str],
                    overrides: set[str]) -> Problem:
    """A module its parent's style shards, given a style of its own. An override that keeps it whole
    can keep the parent whole instead, with every module inside it (the unit ``fixes`` keeps)."""
    block = next((b for b in listed if path.startswith(b + ".")), "")
    message = (f"{_describe(path, decision)} is sharded by the style of {parent} ({decisions[parent].style}), "
               "which leaves it no style of its own; leave it out of the plan")
    if not block or decision.source not in overrides or _layouts_of(decision) != (Act.REPLICATED, Act.AS_READ):
        return Problem(message, block)
    unit = tuple(p[len(block) + 1:] for p in decisions if p == parent or p.startswith(parent + "."))
    return Problem(f"{message}, or keep {parent} whole with every module inside ({FIX_OPTION} does)", block, unit,
                   decision)


def messages(found: list[Problem]) -> list[str]:
    """One line per problem; a problem that every block of a structure has is told for its first."""
    shown: dict[str, str] = {}
    for problem in found:
        # the same words with the block left out: the same problem in a later layer
        shown.setdefault(problem.message.replace(f"{problem.block}.", "") if problem.block else problem.message,
                         problem.message)
    return list(shown.values())


def fixes(found: list[Problem]) -> tuple[dict[str, Decision], list[str]]:
    """The decisions that keep each partly kept unit whole, and one line per unit saying so (where,
    and which override caused it)."""
    decided: dict[str, Decision] = {}
    where: dict[tuple, list[str]] = {}  # (cause, unit) -> blocks
    for problem in found:
        if not problem.unit:
            continue
        cause = problem.cause
        for rel in problem.unit:
            path = f"{problem.block}.{rel}"
            decided.setdefault(path, Decision(path, KEEP, f"{cause.source}, whole unit", cause.pattern))
        rel = cause.module[len(problem.block) + 1:]
        where.setdefault((cause.source, cause.pattern, rel, problem.unit), []).append(problem.block)
    notes = [f"{source} {pattern!r} keeps {rel} whole, so its whole unit ({', '.join(unit)}) is kept whole in "
             f"{_blocks(blocks)} ({FIX_ARGUMENT})" for (source, pattern, rel, unit), blocks in where.items()]
    return decided, notes


def _blocks(paths: list[str]) -> str:
    """The block, or how many blocks and the first of them."""
    return paths[0] if len(paths) == 1 else f"{len(paths)} blocks ({paths[0]}, ...)"
