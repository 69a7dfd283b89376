"""Weight layouts: which rows of a (possibly fused) dimension each rank holds.

A fused projection packs several parts along one dimension: q, k and v in ``qkv_proj``,
gate and up in ``gate_up_proj``. Sharding such a dimension contiguously hands rank 0 all
of q and none of v. A ``Layout`` describes the dimension as a sequence of parts, each made
of whole units (heads, or single rows), and gives every rank its own slice of every part,
in order: Megatron's "stride".

A part of single rows that nothing groups (an MLP's intermediate features, a convolution's
channels) may split unevenly, as ``torch.chunk`` and DTensor's ``Shard`` split: every rank
``ceil(units / tp)`` rows, the last ones fewer (rank 0 holds the larger shard), none refused. Only a
layout of that one part may: the row parts of a fused weight (gate and up) must split evenly, and
heads must stay whole (query heads split balanced, below).

A part with fewer units than ranks (the kv heads of GQA with TP > kv heads, or the single
kv head of multi-query attention) is replicated: rank ``r`` holds unit ``r * units // tp``,
so every rank holds the kv head its query heads use. kv heads that neither divide by the TP size
nor divide it (3 kv heads for 6 query heads at TP=2: rank 0's query heads 0-2 read kv heads 0, 0
and 1) are held by need: a part that ``serves`` that many query heads gives each rank the kv head
of each of its query heads, in order, so the rank's attention has one kv head per query head.
Query heads split balanced where they do not divide (``balanced``: 6 heads
over 4 ranks as 2, 2, 1, 1, the first ``units % tp`` ranks one more, as DeepSpeed splits them), and
the kv heads they read are then held by need (6 query heads reading 3 kv heads at TP=4: kv heads
0, 0 / 1, 1 / 2 / 2); no DTensor placement describes that, so such a weight is stored whole.
Falcon's kv groups (``[q heads of the group; k; v]``, ``group_q`` query heads each) with fewer
groups than ranks are shared alike: each of a group's ranks holds its share of the group's query
heads, then the group's k and v.

How the parameter is stored (one ``Shard`` DTensor, one DTensor per part, or whole where rows
repeat) is tp/sharding/tags.py's. ``placement`` says which DTensor placement, if any, describes
an activation laid out like the weight's rows (one part: ``Shard``; equal parts: ``_StridedShard``).

Example::
    >>> qkv = Layout((Part(8, 4), Part(2, 4, replicable=True), Part(2, 4, replicable=True)))
    >>> qkv.rows(tp=4, rank=1)   # q heads 2-3, kv head 0, v head 0
    [8, ..., 15, 32, 33, 34, 35, 40, 41, 42, 43]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.distributed.tensor import Placement, Shard
from torch.distributed.tensor.placement_types import _StridedShard


def _uneven(units: int, tp: int) -> bool:
    """Whether ``units`` heads split over ``tp`` ranks unevenly, each rank holding at least one."""
    return 1 < tp < units and units % tp != 0


def balanced_block(units: int, tp: int, rank: int) -> range:
    """The units rank ``rank`` holds when ``units`` split as evenly as they go, in rank order, the
    first ``units % tp`` ranks one more (6 over 4: 0-1, 2-3, 4, 5; an even split where tp divides)."""
    per, more = divmod(units, tp)
    start = rank * per + min(rank, more)
    return range(start, start + per + (rank < more))


@dataclass(frozen=True)
class Part:
    """``units`` whole units of ``unit_rows`` rows each; a replicable part may have fewer units than ranks."""

    units: int
    unit_rows: int
    replicable: bool = False
    name: str = "part"
    unit: str = "units"  # what a unit is, for messages: heads, groups, rows
    multiple: int = 1  # each rank's units must be a multiple of this (a kernel's alignment) ...
    why_multiple: str = ""  # ... for this reason
    uneven: bool = False  # alone in its layout, it may split as torch.chunk does (rows nothing groups)
    may_be_empty: bool = False  # ... leaving the last ranks none (a linear's features; not a convolution's channels)
    serves: int = 0  # kv heads: the query heads they serve, each rank's held by need when no even split exists
    group_q: int = 0  # kv groups: the query heads of each group (its k and v heads follow them)
    balanced: bool = False  # query heads: where they do not divide, the first units % tp ranks hold one more

    def balances(self, tp: int) -> bool:
        """Whether the heads split unevenly, as evenly as they go (6 over 4 ranks: 2, 2, 1, 1)."""
        return self.balanced and _uneven(self.units, tp)

    def splits_groups(self, tp: int) -> bool:
        """Whether ranks share kv groups (fewer groups than ranks): each of a group's ranks holds
        some of the group's query heads and the group's k and v heads."""
        return (self.group_q > 0 and 1 < tp and self.units < tp and tp % self.units == 0
                and self.group_q % (tp // self.units) == 0)

    def by_need(self, tp: int) -> bool:
        """Whether each rank holds the units its ``serves`` query heads read (one per query head):
        the kv heads neither split nor replicate evenly, or the query heads split balanced."""
        if not (self.replicable and self.serves > 0 and self.serves % self.units == 0 and self.units % tp != 0):
            return False
        return _uneven(self.serves, tp) or (tp % self.units != 0 and self.serves % tp == 0)

    def repeats(self, tp: int) -> bool:
        """Whether it is stored whole on every rank: some of its units go to more than one rank, or
        they split balanced, which no DTensor placement describes."""
        return tp > 1 and (self.units < tp or self.by_need(tp) or self.balances(tp))

    @property
    def rows(self) -> int:
        return self.units * self.unit_rows

    def replicas(self, tp: int) -> int:
        return tp // self.units if self.units < tp else 1

    def problem(self, tp: int, alone: bool = False) -> str | None:
        """Why this part cannot split over ``tp`` ranks, or None; ``alone``: it is its layout's only part."""
        if self.units % tp == 0:
            per_rank = self.units // tp
            if per_rank % self.multiple:
                return (f"{self.name}: {per_rank} {self.unit} per rank at tp={tp} are not a multiple of "
                        f"{self.multiple}, {self.why_multiple}")
            return None
        if (self.replicable and (tp % self.units == 0 or self.by_need(tp))) or self.splits_groups(tp):
            return None
        if self.balances(tp):
            return None
        if self.uneven and alone and self.multiple == 1:
            if len(self.local_units(tp, tp - 1)) or self.may_be_empty:
                return None  # the last ranks hold fewer rows, or none
            # a convolution cannot run with no output channels (torch refuses the empty weight)
            return (f"{self.name}: {self.units} {self.unit} split as torch.chunk splits them "
                    f"({-(-self.units // tp)} per rank) leave rank {tp - 1} none at tp={tp}")
        if self.uneven and not alone:
            return (f"{self.name}: {self.units} {self.unit} do not divide by tp={tp}, and the parts of a fused "
                    "weight must split evenly (each rank holds the same share of every part)")
        how = " nor does tp divide by it (to replicate them)" if self.replicable else ""
        return f"{self.name}: {self.units} {self.unit} of {self.unit_rows} rows do not divide by tp={tp}{how}"

    def local_units(self, tp: int, rank: int) -> Sequence[int]:
        """The units rank ``rank`` holds: a block of ``ceil(units / tp)`` in rank order, as
        torch.chunk splits (equal blocks when ``tp`` divides ``units``), the one unit it shares
        with other ranks when a replicable part has fewer units than ranks, or, held by need, the
        unit of each query head the rank computes."""
        if self.balances(tp):
            return balanced_block(self.units, tp, rank)
        if self.by_need(tp):
            per_unit = self.serves // self.units
            return [head // per_unit for head in balanced_block(self.serves, tp, rank)]
        if self.units < tp and (self.replicable or self.splits_groups(tp)):
            unit = rank * self.units // tp
            return range(unit, unit + 1)
        per = -(-self.units // tp)
        start = min(rank * per, self.units)
        return range(start, min(start + per, self.units))

    def local_rows(self, tp: int, rank: int) -> list[int]:
        """Offsets, within the part, of the rows rank ``rank`` holds, in local order: those of its
        units or, where ranks share kv groups, its share of its group's query heads, then the
        group's k and v heads."""
        if self.splits_groups(tp):
            group, share = divmod(rank, tp // self.units)
            head_rows = self.unit_rows // (self.group_q + 2)
            q_rows = self.group_q // (tp // self.units) * head_rows
            first = group * self.unit_rows
            return [*range(first + share * q_rows, first + (share + 1) * q_rows),
                    *range(first + self.group_q * head_rows, first + self.unit_rows)]
        return [unit * self.unit_rows + row for unit in self.local_units(tp, rank) for row in range(self.unit_rows)]


@dataclass(frozen=True)
class Layout:
    parts: tuple[Part, ...]

    @property
    def size(self) -> int:
        return sum(p.rows for p in self.parts)

    def problems(self, tp: int) -> list[str]:
        found = [msg for p in self.parts if (msg := p.problem(tp, alone=len(self.parts) == 1))]
        if len(found) == len(self.parts) > 1 and len({(p.units, p.unit_rows) for p in self.parts}) == 1:
            # equal parts fail alike: say it once
            return [f"each of {len(self.parts)} equal parts: " + found[0].split(": ", 1)[1]]
        return found

    def rows(self, tp: int, rank: int) -> list[int]:
        """Indices, along the fused dimension, of the rows rank ``rank`` holds, in local order."""
        out, start = [], 0
        for part in self.parts:
            out.extend(start + row for row in part.local_rows(tp, rank))
            start += part.rows
        return out

    def repeats_rows(self, tp: int) -> bool:
        """Whether some rows go to more than one rank (a part with fewer units than ranks)."""
        return any(p.repeats(tp) for p in self.parts)

    def placement(self, dim: int, tp: int) -> Placement | None:
        """The DTensor placement that gives exactly these slices, or None if there is none."""
        if self.repeats_rows(tp):
            return None  # replicated units: no single placement on a 1-D mesh
        if len(self.parts) == 1:
            return Shard(dim)
        if len({p.rows for p in self.parts}) == 1:
            return _StridedShard(dim, split_factor=len(self.parts))
        return None

    def shard(self, tensor: torch.Tensor, dim: int, tp: int, rank: int) -> torch.Tensor:
        index = torch.tensor(self.rows(tp, rank), dtype=torch.long, device=tensor.device)
        return tensor.index_select(dim, index).contiguous()
