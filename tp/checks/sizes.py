"""Which tensor dimension each style shards, and the divisibility checks made before sharding."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from torch import nn

from ..errors import PlanError, SizeError
from ..patterns import matches
from ..plan.resolved import Decision, ResolvedPlan
from ..sharding.heads import Heads
from ..sharding.layouts import Layout, Part
from ..styles.descriptor import Act, LayoutMap


def layouts(decision: Decision, module: nn.Module) -> LayoutMap | None:
    """Parameter -> (layout, dim) for a style that shards by a layout, else None."""
    return decision.style.style.layouts(decision.style.site(module, heads=decision.heads))


def sharded_dims(decision: Decision, module: nn.Module) -> dict[str, int]:
    """Parameter -> the dimension split evenly over the ranks."""
    return decision.style.style.sharded_dims(decision.style.site(module, heads=decision.heads))


def rank_sizes(shape: tuple[int, ...], dim: int | None, tp: int, layout: Layout | None = None) -> list[int] | None:
    """The size of dimension ``dim`` on each rank, or None where every rank stores the whole
    tensor (no dimension sharded, or a layout that gives some rows to several ranks, stored whole:
    tp/sharding/tags.py). Uneven rows split as torch.chunk does: rank 0 holds the largest shard."""
    if dim is None or (layout is not None and layout.repeats_rows(tp)):
        return None
    layout = layout or Layout((Part(shape[dim], 1),))
    return [sum(len(p.local_rows(tp, rank)) for p in layout.parts) for rank in range(tp)]


def local_shape(shape: tuple[int, ...], dim: int | None, tp: int, layout: Layout | None = None) -> tuple[int, ...]:
    """The shape rank 0 stores (it holds the largest shard when the sizes are uneven)."""
    sizes = rank_sizes(shape, dim, tp, layout)
    return tuple(shape) if sizes is None else tuple(sizes[0] if i == dim else s for i, s in enumerate(shape))


def uneven_note(shape: tuple[int, ...], dim: int | None, tp: int, layout: Layout | None = None) -> str:
    """For ``tp plan``: " (dim 0 per rank: 101, 100)" where the ranks hold different sizes, the rows
    each rank computes with where the tensor is stored whole for a layout, else ""."""
    if dim is not None and layout is not None and layout.repeats_rows(tp):
        used = [len(layout.rows(tp, rank)) for rank in range(tp)]
        return f" (stored whole; each rank computes with {_runs(used)} of dim {dim})"
    sizes = rank_sizes(shape, dim, tp, layout)
    if sizes is None or len(set(sizes)) == 1:
        return ""
    return f" (dim {dim} per rank: {_runs(sizes)})"


def _runs(sizes: list[int]) -> str:
    """``[24, 24, 16]`` as "24 x2, 16"."""
    runs = [(size, len(list(group))) for size, group in itertools.groupby(sizes)]
    return ", ".join(f"{s} x{n}" if n > 1 else str(s) for s, n in runs)


@dataclass(frozen=True)
class Constraint:
    module: str
    what: str
    value: int


@dataclass(frozen=True)
class Unfit:
    """A style whose layout cannot be built for its module at all (parts that do not add up to
    the module's size): a problem at every TP size."""

    reason: str

    def problems(self, tp: int) -> list[str]:
        return [self.reason]


def _head_dim(parent: nn.Module | None, size: int, heads: Heads | None) -> int | None:
    """The size of one head, if a dimension of ``size`` features of a child of ``parent`` holds heads:
    the parent's ``head_dim``, else the model's, where the size is that of all its q or kv heads
    (T5 names it ``key_value_proj_dim``; with uneven splits allowed, only this keeps heads whole)."""
    head_dim = getattr(parent, "head_dim", None)
    if isinstance(head_dim, int) and head_dim > 0:
        return head_dim
    if parent is not None and heads is not None and size in (heads.q * heads.dim, heads.kv * heads.dim):
        return heads.dim
    return None


def _reads_heads(module: nn.Module, parent: nn.Module | None, heads: Heads) -> bool:
    """Whether a module that reads feature-sharded activations reads attention heads: it sits in an
    attention module (one with a ``head_dim``), or a parameter of its spans all the q or kv heads'
    features (a norm over o_proj's input), not an MLP's intermediate features."""
    if _head_dim(parent, 0, None) is not None:
        return True
    widths = {heads.q * heads.dim, heads.kv * heads.dim}
    return any(size in widths for p in module.parameters() for size in p.shape)


def constraints(model: nn.Module, plan: ResolvedPlan, paths: set[str] | None = None
                ) -> tuple[list[Constraint], list[tuple[str, Layout | Unfit]]]:
    """Every quantity that must divide by the TP size, and every layout whose parts must split
    (for the modules in ``paths``, default all)."""
    found, laid_out = [], []
    for path, decision in plan.decisions.items():
        if paths is not None and path not in paths:
            continue
        module = model.get_submodule(path)
        style = decision.style.style
        parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else None
        if (plan.heads is not None and not style.reads_balanced_heads
                and style.input_layout(decision.style.options) is Act.FEATURES
                and _reads_heads(module, parent, decision.heads or plan.heads)):
            # heads that do not divide split balanced (2, 2, 1, 1), which this style cannot read
            found.append(Constraint(path, f"attention heads ({decision.style.name} reads them split)", plan.heads.q))
        try:
            by_layout = layouts(decision, module)
        except PlanError as e:
            laid_out.append((path, Unfit(f"{decision.style}: {e}")))
            continue
        if by_layout is not None:
            laid_out += [(f"{path}.{name}", layout) for name, (layout, _) in by_layout.items()]
            continue
        # rows split as torch.chunk does (a vocabulary, an MLP's intermediate features) need not
        # divide, and a rank may hold none (an empty weight is fine for F.linear and a lookup); the
        # heads among them must still divide
        uneven = decision.style.style.uneven_ok(decision.style.options)
        for name, dim in sharded_dims(decision, module).items():
            param = getattr(module, name, None)
            if param is None:
                continue
            size = param.shape[dim]
            # one value per head (a gate, a sink, T5's relative bias) splits as torch.chunk does,
            # which matches the heads' split only where they divide (not a balanced one)
            per_head = plan.heads is not None and size in (plan.heads.q, plan.heads.kv)
            if not uneven or per_head:
                found.append(Constraint(path, f"{name}.shape[{dim}]", size))
            head_dim = _head_dim(parent, size, decision.heads or plan.heads)
            # In attention, a shard must hold whole heads, not just a whole number of features.
            if name == "weight" and head_dim and not per_head and size % head_dim == 0:
                found.append(Constraint(path, f"heads ({size} / head_dim {head_dim})", size // head_dim))
                heads = decision.heads or plan.heads
                if heads is not None and size // head_dim != heads.q and size // head_dim % heads.q == 0:
                    # several blocks per query head (a gated q_proj: q and gate of each head) split
                    # as torch.chunk splits them, which keeps each head's blocks together only
                    # where the heads divide
                    found.append(Constraint(path, f"attention heads ({size // head_dim // heads.q} blocks "
                                                  "of head_dim each)", heads.q))
    return found, laid_out


def _collapse(path: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", path)


def _lines(found: list[Constraint], laid_out: list[tuple[str, Layout]], tp: int) -> list[str]:
    lines = []
    for c in found:
        if c.value % tp:
            lines.append(f"{_collapse(c.module)}: {c.what} = {c.value} does not divide by tp={tp}")
    for path, layout in laid_out:
        lines += [f"{_collapse(path)}: {problem}" for problem in layout.problems(tp)]
    return list(dict.fromkeys(lines))


def problems(model: nn.Module, plan: ResolvedPlan, tp: int) -> tuple[list[str], list[int]]:
    """Lines describing each quantity that does not divide by ``tp``, and the sizes (up to 64) that work."""
    found, laid_out = constraints(model, plan)
    working = [n for n in range(1, 65) if not _lines(found, laid_out, n)]
    return _lines(found, laid_out, tp), working


def unit_problems(model: nn.Module, plan: ResolvedPlan, tp: int) -> dict[str, str]:
    """For an inferred plan: unit key -> the first of its sizes that does not divide by ``tp``."""
    found = {}
    for key, paths in plan.units.items():
        lines = _lines(*constraints(model, plan, set(paths)), tp)
        if lines:
            found[key] = lines[0]
    return found


def check(model: nn.Module, plan: ResolvedPlan, tp: int) -> None:
    lines, sizes = problems(model, plan, tp)
    if lines:
        raise SizeError(
            "cannot shard at tp={}:\n  {}\nTP sizes that divide every sharded size of this model: {}".format(
                tp, "\n  ".join(lines), ", ".join(map(str, sizes)) or "none up to 64")
        )


def divide_attributes(model: nn.Module, patterns: list[str], tp: int) -> list[str]:
    """Divide per-rank head counts that a model stores as attributes (``self_attn.num_heads``)."""
    changed = []
    for spec in patterns:
        module_pattern, _, attr = spec.rpartition(".")
        for path, module in model.named_modules():
            if module_pattern and not matches(module_pattern, path):
                continue
            value = getattr(module, attr, None)
            if not isinstance(value, int):
                continue
            if value % tp:
                raise SizeError(f"{path}.{attr} = {value} does not divide by tp={tp}")
            setattr(module, attr, value // tp)
            changed.append(f"{path}.{attr}")
    return changed
