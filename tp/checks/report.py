"""What tp.apply did (or, for a dry run, would do): one row per module, and the totals."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..plan.resolved import Decision, ResolvedPlan
from ..plan.structure import find_blocks
from .sizes import layouts, local_shape, sharded_dims, uneven_note


@dataclass(frozen=True)
class Row:
    module: str
    kind: str
    style: str
    source: str
    shapes: str


@dataclass(frozen=True)
class Collectives:
    """Expected collectives of one forward and one backward pass, per block and in total."""

    forward_per_block: int
    backward_per_block: int
    forward_outside: int
    backward_outside: int
    blocks: int

    @property
    def forward(self) -> int:
        return self.forward_per_block * self.blocks + self.forward_outside

    @property
    def backward(self) -> int:
        return self.backward_per_block * self.blocks + self.backward_outside


@dataclass
class Report:
    family: str | None
    tp: int
    rows: list[Row]
    collectives: Collectives
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    trial: str = ""  # how the plan was tried before sharding (tp.apply sets it)

    def style_of(self, module: str) -> str | None:
        return next((r.style for r in self.rows if r.module == module), None)

    def source_of(self, module: str) -> str | None:
        return next((r.source for r in self.rows if r.module == module), None)

    def __str__(self) -> str:
        head = ("module", "type", "style", "decided by", "parameter shapes: global -> per rank")
        table = [head] + [(r.module, r.kind, r.style, r.source, r.shapes) for r in self.rows]
        widths = [max(len(row[i]) for row in table) for i in range(4)]
        lines = [
            f"tp plan: family {self.family or '(none: inferred from the module structure)'}, tp={self.tp}",
        ]
        for row in table:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4])
        c = self.collectives
        lines.append(
            f"expected collectives: forward {c.forward_per_block} per block x {c.blocks} blocks + {c.forward_outside} "
            f"(embedding, lm_head) = {c.forward}; backward {c.backward_per_block} per block x {c.blocks} + "
            f"{c.backward_outside} = {c.backward}"
        )
        if self.trial:
            lines.append(f"trial: {self.trial}")
        lines += [f"warning: {w}" for w in self.warnings]
        lines += [f"problem: {p}" for p in self.problems]
        return "\n".join(lines)


def _shapes(module: nn.Module, decision: Decision | None, tp: int, by_layout: dict | None = None) -> str:
    """Each parameter's global and per-rank shape, from the module's style or, for a child that
    its parent's style shards (a Mamba-2 mixer's in_proj), from the layouts given."""
    by_layout = by_layout or (layouts(decision, module) if decision else None) or {}
    dims = sharded_dims(decision, module) if decision else {}
    parts = []
    for name, param in module.named_parameters(recurse=False):
        shape = tuple(param.shape)
        layout, dim = by_layout.get(name, (None, dims.get(name)))
        parts.append(f"{name} {list(shape)} -> {list(local_shape(shape, dim, tp, layout))}"
                     + uneven_note(shape, dim, tp, layout))
    return "; ".join(parts)


def _ancestors(path: str) -> list[str]:
    """The paths of the modules enclosing ``path``, nearest first (the root, "", included)."""
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)]


def expected_collectives(model: nn.Module, plan: ResolvedPlan, tp: int) -> Collectives:
    """The sum of each module's collectives as its style declares them (``Style.collectives``).

    Forward: one all-reduce per row-parallel linear and for the embedding, one all-gather for
    gathered logits. Backward: one all-reduce per shared block input, per column-parallel linear
    that reads a plain tensor, for the lm_head input, per replicated region, and per parameter
    with replicated rows (kv heads with TP > kv heads). With sequence parallelism each
    all-reduce becomes a reduce-scatter and an all-gather."""
    decisions = plan.decisions
    blocks = find_blocks(model)
    if tp == 1:  # one rank communicates nothing; the styles declare what they do on several
        return Collectives(0, 0, 0, 0, len(blocks))
    sp = plan.sequence_parallel

    def count(paths):
        shared = {p for p in paths if decisions[p].style.style.shares_input}
        costs = []
        for path in paths:
            spec = decisions[path].style
            # A shared block input inside another one (Yuan's lf_gate in its attention) reads the
            # outer one's replicated DTensor, as a column-parallel linear reads its parent's.
            readers = _ancestors(path) if spec.style.shares_input else [path.rpartition(".")[0]]
            site = spec.site(model.get_submodule(path), heads=decisions[path].heads, tp=tp, sequence_parallel=sp,
                             plain_input=not shared.intersection(readers))
            costs.append(spec.style.collectives(site))
        return sum(c[0] for c in costs), sum(c[1] for c in costs)

    # Blocks may differ (hybrid and interleaved-MoE models): count each; per block is the average
    # rounded down, and the remainder is counted with the collectives outside the blocks.
    per_block = [count([p for p in decisions if p.startswith(b + ".")]) for b in blocks]
    outside = [p for p in decisions if not any(p.startswith(b + ".") for b in blocks)]
    fwd_out, bwd_out = count(outside)
    n = max(len(blocks), 1)
    fwd_block, bwd_block = sum(f for f, _ in per_block) // n, sum(b for _, b in per_block) // n
    fwd_out += sum(f for f, _ in per_block) - fwd_block * n
    bwd_out += sum(b for _, b in per_block) - bwd_block * n
    return Collectives(fwd_block, bwd_block, fwd_out, bwd_out, len(blocks))


def _tied_holders(model: nn.Module, plan: ResolvedPlan) -> dict[str, str]:
    """Module without a style -> the styled module whose parameters it shares (T5's ``shared``):
    tp.apply gives it that module's sharded parameters."""
    styled = {}
    for path in plan.decisions:
        for param in model.get_submodule(path).parameters(recurse=False):
            styled.setdefault(id(param), path)
    found = {}
    for path, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        if path not in plan.decisions and params and all(id(p) in styled for p in params):
            found[path] = styled[id(params[0])]
    return found


def _sharded_by_parent(model: nn.Module, plan: ResolvedPlan) -> dict[str, tuple[str, dict]]:
    """Child module -> (the styled parent that shards it, parameter -> (layout, dim))."""
    found: dict[str, tuple[str, dict]] = {}
    for path, decision in plan.decisions.items():
        for name, laid in (layouts(decision, model.get_submodule(path)) or {}).items():
            child, _, param = name.rpartition(".")
            if child:
                found.setdefault(f"{path}.{child}", (path, {}))[1][param] = laid
    return found


def build(model: nn.Module, plan: ResolvedPlan, tp: int, problems: list[str] = ()) -> Report:
    rows = []
    tied = _tied_holders(model, plan)
    by_parent = _sharded_by_parent(model, plan)
    for path, module in model.named_modules():
        if not path:
            continue
        decision = plan.decisions.get(tied.get(path, path))
        has_params = any(True for _ in module.parameters(recurse=False))
        if path in by_parent:
            parent, laid = by_parent[path]
            rows.append(Row(path, type(module).__name__, f"in {plan.decisions[parent].style}", f"sharded by {parent}",
                            _shapes(module, None, tp, by_layout=laid)))
            continue
        if decision is None:
            if not has_params:
                continue
            style, source = "whole", "not in plan"
        elif path in tied:
            style, source = "tied", f"tied to {tied[path]}"
        else:
            style, source = str(decision.style), decision.source
        rows.append(Row(path, type(module).__name__, style, source, _shapes(module, decision, tp)))
    return Report(plan.family, tp, rows, expected_collectives(model, plan, tp), list(plan.warnings), list(problems))
