"""Tied parameters (an embedding and the lm_head sharing one weight) stay tied through sharding.

``parallelize_module`` replaces parameters one module at a time, which unties shared ones:
``tied_groups`` records them before, ``retie`` restores them after.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import DTensor

from ..errors import PlanError


def tied_groups(model: nn.Module) -> list[list[tuple[str, str]]]:
    """Groups of (module path, parameter name) that share one Parameter, such as tied embeddings."""
    owners: dict[int, list[tuple[str, str]]] = {}
    for path, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((path, name))
    return [group for group in owners.values() if len(group) > 1]


def retie(model: nn.Module, groups: list[list[tuple[str, str]]], styled: set[str] = frozenset()) -> None:
    """Give every member of each group the one sharded parameter.

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
