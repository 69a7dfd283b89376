"""Which tensor dimension each style shards, and the divisibility checks made before sharding."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from torch import nn

from .errors import SizeError
from .plan import ResolvedPlan

# style -> parameter name -> sharded dimension, for the module types the style supports.
SHARDED_DIMS: dict[str, dict[type, dict[str, int]]] = {
    "colwise": {nn.Linear: {"weight": 0, "bias": 0}, nn.Embedding: {"weight": 1}},
    "lm_head": {nn.Linear: {"weight": 0, "bias": 0}},
    "rowwise": {nn.Linear: {"weight": 1}},
    "embedding": {nn.Embedding: {"weight": 0}},
}


def sharded_dims(style: str, module: nn.Module) -> dict[str, int]:
    if style == "head_norm":
        return {n: 0 for n, p in module.named_parameters(recurse=False) if p.dim() >= 2}
    for kind, dims in SHARDED_DIMS.get(style, {}).items():
        if isinstance(module, kind):
            return dims
    return {}


def local_shape(shape: tuple[int, ...], dim: int | None, tp: int) -> tuple[int, ...]:
    if dim is None:
        return tuple(shape)
    return tuple(s // tp if i == dim else s for i, s in enumerate(shape))


@dataclass(frozen=True)
class Constraint:
    module: str
    what: str
    value: int


def _head_dim(parent: nn.Module | None) -> int | None:
    head_dim = getattr(parent, "head_dim", None)
    return head_dim if isinstance(head_dim, int) and head_dim > 0 else None


def constraints(model: nn.Module, plan: ResolvedPlan) -> list[Constraint]:
    """Every quantity that must divide by the TP size for the plan to be correct."""
    found = []
    for path, decision in plan.decisions.items():
        module = model.get_submodule(path)
        parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else None
        for name, dim in sharded_dims(decision.style.name, module).items():
            param = getattr(module, name, None)
            if param is None:
                continue
            size = param.shape[dim]
            found.append(Constraint(path, f"{name}.shape[{dim}]", size))
            head_dim = _head_dim(parent)
            # In attention, a shard must hold whole heads, not just a whole number of features.
            if name == "weight" and head_dim and size % head_dim == 0 and isinstance(module, nn.Linear):
                found.append(Constraint(path, f"heads ({size} / head_dim {head_dim})", size // head_dim))
    return found


def working_sizes(values: list[int], up_to: int = 64) -> list[int]:
    g = 0
    for v in values:
        g = math.gcd(g, v)
    return [n for n in range(1, up_to + 1) if g % n == 0] if g else list(range(1, up_to + 1))


def _collapse(path: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", path)


def problems(model: nn.Module, plan: ResolvedPlan, tp: int) -> tuple[list[str], list[int]]:
    """Lines describing each quantity that does not divide by ``tp``, and the sizes that work."""
    found = constraints(model, plan)
    lines = []
    for c in found:
        if c.value % tp:
            line = f"{_collapse(c.module)}: {c.what} = {c.value} does not divide by tp={tp}"
            if line not in lines:
                lines.append(line)
    return lines, working_sizes([c.value for c in found])


def check(model: nn.Module, plan: ResolvedPlan, tp: int) -> None:
    lines, sizes = problems(model, plan, tp)
    if lines:
        raise SizeError(
            "cannot shard at tp={}:\n  {}\nTP sizes that divide every sharded size of this model: {}".format(
                tp, "\n  ".join(lines), ", ".join(map(str, sizes)))
        )


def divide_attributes(model: nn.Module, patterns: list[str], tp: int) -> list[str]:
    """Divide per-rank head counts that a model stores as attributes (``self_attn.num_heads``)."""
    from .patterns import matches

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
