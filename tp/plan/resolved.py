"""A resolved plan: which module gets which style, which source decided it, and what else
sharding the model changes (per-rank head counts, divided attributes). ``tp.apply`` only
executes it; the size check and the report read it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn
from torch.distributed.tensor.parallel import ParallelStyle

from ..sharding.heads import Heads
from ..styles import StyleSpec


@dataclass(frozen=True)
class Decision:
    module: str
    style: StyleSpec
    source: str
    pattern: str | None = None
    heads: Heads | None = None  # the heads as this module sees them (its parent's own head size)


@dataclass
class ResolvedPlan:
    family: str | None
    decisions: dict[str, Decision]
    warnings: list[str] = field(default_factory=list)
    heads: Heads | None = None
    inference: Any = None  # the traced dataflow (tp.infer.Inference) when the plan was inferred
    local_counts: dict[str, str] = field(default_factory=dict)  # "module_pattern.attr" -> head kind
    divide: list[str] = field(default_factory=list)  # "module_pattern.attr" divided by the TP size
    units: dict[str, list[str]] = field(default_factory=dict)  # inferred unit key -> its module paths
    inconsistencies: list[str] = field(default_factory=list)  # where the styles' layouts do not fit together

    @property
    def sequence_parallel(self) -> bool:
        return any(dict(d.style.args).get("sequence_dim") is not None
                   for d in self.decisions.values() if d.style.style.takes_sequence_dim)

    def styles(self, model: nn.Module) -> dict[str, ParallelStyle]:
        return {path: d.style.build(model.get_submodule(path), d.heads) for path, d in self.decisions.items()}

    def with_style(self, path: str, style: StyleSpec) -> None:
        self.decisions[path] = replace(self.decisions[path], style=style)
