"""A style's descriptor: everything the rest of tp knows about one style, in one object.

The size check reads which parameter dimensions a style shards (or the layouts it shards them
by), the report reads its collectives, the plan reads how it takes part in sequence
parallelism, and plan checks can follow the layouts of the activations it reads and leaves.
No module outside a style's own asks for a style by name.

A style is one module that defines its ``ParallelStyle`` and a ``Style``; built-in styles are
listed in ``tp/styles/table.py``, and a user registry adds its own under ``[styles]``.

Example::
    >>> class ScaleArgs(Args):
    ...     factor: float = 1.0
    >>> SCALE = Style(
    ...     name="scale", args=ScaleArgs, build=lambda site: KeepWhole(),
    ...     reads=Act.REPLICATED, leaves=Act.AS_READ,
    ...     doc="whole on every rank, output scaled")
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict
from torch import nn
from torch.distributed.tensor.parallel import ParallelStyle

from ..sharding.heads import Heads
from ..sharding.layouts import Layout

LayoutMap = dict[str, tuple[Layout, int]]  # parameter ("child.param" for a child's) -> (layout, dim)


def stored_whole(layouts: LayoutMap | None, tp: int) -> int:
    """How many of ``layouts``' parameters hold rows stored whole on every rank at ``tp`` (replicated
    kv heads, heads split balanced): the gradient of each is all-reduced in the backward."""
    return sum(layout.repeats_rows(tp) for layout, _ in (layouts or {}).values())


class Act(enum.Enum):
    """The layout of an activation where a style reads it or leaves it."""

    REPLICATED = "replicated"
    FEATURES = "sharded on features"
    SEQUENCE = "sharded on the sequence"
    PARTIAL = "partial sums"
    ANY = "any layout"  # the style works on whatever it is given (only for what it reads)
    AS_READ = "as it was read"  # the style does not change the layout (only for what it leaves)


class Args(BaseModel):
    """The arguments a plan may give a style; each style with arguments subclasses it.

    Strict: ``parts = "2"`` or ``loss_parallel = 1`` is refused, not converted."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


@dataclass(frozen=True)
class Site:
    """A style at one module: what building it, its shards and its collectives depend on."""

    module: nn.Module
    args: Args
    heads: Heads | None = None  # the heads as this module sees them, if the model has attention
    tp: int = 1
    sequence_parallel: bool = False  # the activations between blocks are sharded along the sequence
    plain_input: bool = True  # no shared block input (``block_input``) replicates its input once


class PlainStyle(ParallelStyle):
    """A ParallelStyle that takes no arguments; it prints as its constructor call."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _no_dims(site: Site) -> dict[str, int]:
    return {}


def _no_layouts(site: Site) -> LayoutMap | None:
    return None


def _never(args: Args) -> bool:
    return False


def _free(site: Site) -> tuple[int, int]:
    return 0, 0


@dataclass(frozen=True)
class Style:
    """One style: how to build it and what it does to parameters, activations and communication.

    Attributes:
        name: the name plans use.
        build: ``site -> ParallelStyle`` for one module.
        doc: one line for ``tp plan`` and the README.
        args: the pydantic model of its plan arguments.
        supports: module types it applies to (empty: any).
        reads, leaves: the layout of the activation it reads and of the one it leaves, or a
            function of its arguments giving it.
        sharded_dims: parameter -> dimension split evenly over the ranks.
        layouts: parameter -> (layout, dim) for styles that shard by a ``Layout`` (fused parts,
            heads, experts); when it gives a map, ``sharded_dims`` is not read.
        uneven_ok: whether its shards may differ in size (DTensor pads them), given its arguments.
        collectives: (forward, backward) collectives of one module with this style.
        takes_sequence_dim: under sequence parallelism the plan sets its ``sequence_dim``
            argument (its input or output is then sharded along the sequence).
        sequence_refused: why a plan that uses it cannot run sequence parallel, if it cannot.
        flattens_sequence: its module sees the tokens flattened (batch x sequence, as packed
            experts do), so under sequence parallelism its parent module runs on the gathered
            sequence as one block (``sequence_block``: gathered once before, the output
            reduce-scattered after) and, with ``sequence_dim`` set, it leaves partial sums.
        shares_input: its module's input is replicated once for the column-parallel linears
            inside, whose input gradients are then summed before one all-reduce.
        opens_block: given its arguments, whether the module holding it gets a shared block
            input (``block_input``) derived.
        reads_balanced_heads: it reads feature-sharded activations right when they hold whole heads
            split balanced (6 over 4 ranks as 2, 2, 1, 1, ``Part.balanced``); a style that reads them
            otherwise needs the heads to divide.
        computes_on_dtensors: given its arguments, whether its module computes on replicated
            DTensors that meet its block's input (Yuan's filter adds its input to its output), so
            that the block input stays a DTensor even where it needs no gradient.
    """

    name: str
    build: Callable[[Site], ParallelStyle]
    doc: str
    args: type[Args] = Args
    supports: tuple[type[nn.Module], ...] = ()
    reads: Act | Callable[[Args], Act] = Act.REPLICATED
    leaves: Act | Callable[[Args], Act] = Act.AS_READ
    sharded_dims: Callable[[Site], dict[str, int]] = _no_dims
    layouts: Callable[[Site], LayoutMap | None] = _no_layouts
    uneven_ok: Callable[[Args], bool] = _never
    collectives: Callable[[Site], tuple[int, int]] = _free
    takes_sequence_dim: bool = False
    sequence_refused: str | None = None
    flattens_sequence: bool = False
    shares_input: bool = False
    opens_block: Callable[[Args], bool] = _never
    reads_balanced_heads: bool = False
    computes_on_dtensors: Callable[[Args], bool] = _never

    def input_layout(self, args: Args) -> Act:
        return self.reads(args) if callable(self.reads) else self.reads

    def output_layout(self, args: Args) -> Act:
        return self.leaves(args) if callable(self.leaves) else self.leaves
