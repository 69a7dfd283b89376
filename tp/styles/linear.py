"""The linear styles: column- and row-parallel (plain, or by a layout for fused weights and
convolutions), the vocab-parallel embedding and the lm_head.

A plain ``nn.Linear`` or ``nn.Embedding`` computes on local tensors (``LocalColwise``,
``LocalRowwise``, ``LocalLmHead``, ``LocalEmbedding``), unless the activations between blocks are
sequence-sharded DTensors or the logits stay vocab-parallel. Otherwise each is torch's own
``ColwiseParallel`` / ``RowwiseParallel`` where a contiguous shard is right, and ``ColwiseLayout``
/ ``RowwiseLayout`` (tp/styles/layout.py) for fused, packed or replicated rows, GPT-2's
``Conv1D`` and ``nn.Conv1d``/``nn.Conv2d``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
)

from ..sharding.collectives import f, to_local
from ..sharding.heads import Heads
from .descriptor import Act, Args, LayoutMap, Site, Style, stored_whole
from .local_embedding import LocalEmbedding, is_plain_embedding
from .local_linear import LocalColwise, LocalLmHead, LocalRowwise
from .layout import (
    CONVOLUTIONS,
    UNITS,
    ColwiseLayout,
    Conv1D,
    LayoutParallel,
    RowwiseLayout,
)


def _owned_output(output_layouts, use_local_output, mod, outputs, device_mesh):
    """torch's output preparation of the column and row styles, leaving DTensor by ``to_local``."""
    if outputs.placements != output_layouts:
        outputs = outputs.redistribute(placements=output_layouts, async_op=True)
    return to_local(outputs) if use_local_output else outputs


class OwnedColwiseParallel(ColwiseParallel):
    """torch's ColwiseParallel whose local output the model may change in place (OLMo clamps q, k
    and v with ``clamp_``): the output is ``tp.sharding.collectives.to_local``'s alias, not the
    view ``DTensor.to_local()`` returns, and no copy is made.

    Example::
        >>> parallelize_module(model, mesh, {"layers.0.self_attn.q_proj": OwnedColwiseParallel()})
    """

    _prepare_output_fn = staticmethod(_owned_output)


class OwnedRowwiseParallel(RowwiseParallel):
    """torch's RowwiseParallel whose local output the model may change in place (Falcon's
    ``mlp_output += attention_output``), with no copy (see ``OwnedColwiseParallel``).

    Example::
        >>> parallelize_module(model, mesh, {"layers.0.mlp.dense_4h_to_h": OwnedRowwiseParallel()})
    """

    _prepare_output_fn = staticmethod(_owned_output)


class RowwiseIntoSharded(RowwiseParallel):
    """torch's RowwiseParallel for a linear whose all-reduced output is read by sharded
    computation, not added to the residual stream.

    Mamba's ``x_proj`` reduces the channel-sharded activations to dt, B and C, which every rank
    then applies to its own channels: each rank's gradient of that output is a part of the
    whole, so the backward all-reduces it too (Megatron's ``g`` followed by ``f``).

    Example::
        >>> parallelize_module(model, mesh, {"layers.0.mixer.x_proj": RowwiseIntoSharded()})
    """

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        whole = to_local(outputs.redistribute(placements=output_layouts))
        return f(whole, device_mesh.get_group())


def _needs_layout(module: nn.Module | None, parts, unit: str) -> bool:
    return parts != 1 or unit != "row" or (module is not None and not isinstance(module, (nn.Linear, nn.Embedding)))


class LayoutArgs(Args):
    """``parts``: a number of equal parts (``[gate; up]``: 2) or a list of head kinds (``["q", "kv",
    "kv"]``); ``unit``: what each part is split in (rows, query heads, head_dim blocks, kv groups)."""

    parts: int | tuple[Literal["q", "kv"], ...] = 1
    unit: Literal[UNITS] = "row"

    @field_validator("parts", mode="before")
    @classmethod
    def _parts(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            if not value or any(p not in ("q", "kv") for p in value):
                raise ValueError(f"parts must be a number or a list of 'q' and 'kv', found {list(value)}")
            return tuple(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"parts must be a positive number or a list of 'q' and 'kv', found {value!r}")
        return value

    @field_validator("unit", mode="before")
    @classmethod
    def _unit(cls, value: Any) -> Any:
        if value not in UNITS:
            raise ValueError(f"unit must be one of {', '.join(UNITS)}, found {value!r}")
        return value


class SequenceArgs(Args):
    sequence_dim: int | None = Field(None, description="set by the plan under sequence parallelism")


class RowwiseArgs(LayoutArgs, SequenceArgs):
    """``local_output = false`` keeps the all-reduced output a replicated DTensor, for a module
    whose parent goes on computing on DTensors (Yuan's localized filtering adds its residual)."""

    local_output: bool = True


class LmHeadArgs(SequenceArgs):
    loss_parallel: bool = False


def _sequence(args: SequenceArgs) -> bool:
    return args.sequence_dim is not None


# Modules that compute ``x @ W^T + b``, whatever the weight's storage order.
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())
LAYOUT_TYPES = (*LINEAR_TYPES, *CONVOLUTIONS)


def _plain_linear(module: nn.Module | None) -> bool:
    """An ``nn.Linear`` that computes ``F.linear`` and nothing else, which the local styles run on
    its local shard. A subclass may use its weight as a whole (BitNet scales by the mean of all of
    it), which only DTensor's operators get right on a shard."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _per_head_embedding(module: nn.Module | None, heads: Heads | None) -> bool:
    """An embedding of one value per query head (T5's relative attention bias), whose columns then
    split as the heads do: balanced where they do not divide."""
    return isinstance(module, nn.Embedding) and heads is not None and module.embedding_dim == heads.q


def build_colwise(site: Site) -> ParallelStyle:
    args = site.args
    if _needs_layout(site.module, args.parts, args.unit) or _per_head_embedding(site.module, site.heads):
        return ColwiseLayout(parts=args.parts, unit=args.unit, heads=site.heads)
    return LocalColwise(heads=site.heads) if _plain_linear(site.module) else OwnedColwiseParallel()


def build_rowwise(site: Site) -> ParallelStyle:
    """With ``sequence_dim`` the partial outputs are reduce-scattered along it instead of all-reduced.

    A plain linear then reads its local input features as ``RowwiseLayout`` lays them out: whole
    heads split balanced, or features split as ``torch.chunk`` does. torch's ``RowwiseParallel``
    would read a local input as an even split of the global features."""
    args = site.args
    if _needs_layout(site.module, args.parts, args.unit) or (_sequence(args) and _plain_linear(site.module)):
        return RowwiseLayout(parts=args.parts, unit=args.unit, heads=site.heads, sequence_dim=args.sequence_dim,
                             use_local_output=args.local_output)
    if _sequence(args):
        return RowwiseParallel(output_layouts=Shard(args.sequence_dim), use_local_output=False)
    if args.local_output and _plain_linear(site.module):
        return LocalRowwise(heads=site.heads)
    return OwnedRowwiseParallel(use_local_output=args.local_output)


class CheckedTokenIds(ParallelStyle):
    """A vocab-parallel embedding style that first checks the token ids, as the unsharded embedding
    does: each rank looks up only its rows and would give zeros for an id outside the vocabulary.

    Under ``torch.compile``, and on accelerators, the check is an assertion inside the computation
    (``torch._assert_async``, a RuntimeError): a branch on the ids' values would break the graph,
    and on a GPU it would wait for the device at every call, where the unsharded lookup asserts on
    the device too.

    Example::
        >>> parallelize_module(model, mesh, {"model.embed_tokens": CheckedTokenIds(OwnedRowwiseParallel())})
    """

    def __init__(self, inner: ParallelStyle):
        super().__init__()
        self.inner = inner

    @staticmethod
    def _check(module: nn.Module, args, kwargs) -> None:
        ids = args[0] if args else kwargs.get("input")
        if isinstance(ids, torch.Tensor) and ids.numel():
            ids = ids.to_local() if isinstance(ids, DTensor) else ids
            if ids.device.type != "cpu" or torch.compiler.is_compiling():
                torch._assert_async(((ids >= 0) & (ids < module.num_embeddings)).all(), "index out of range in self")
                return
            low, high = torch.aminmax(ids)
            if low < 0 or high >= module.num_embeddings:
                raise IndexError("index out of range in self")  # what nn.Embedding raises

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        module.register_forward_pre_hook(self._check, with_kwargs=True)  # before the inner style's hooks
        return self.inner._apply(module, device_mesh)

    def __repr__(self) -> str:
        return f"CheckedTokenIds({self.inner!r})"


def build_embedding(site: Site) -> ParallelStyle:
    """The looked-up vectors all-reduced or, with ``sequence_dim``, reduce-scattered along the sequence."""
    if _sequence(site.args):
        return CheckedTokenIds(RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(site.args.sequence_dim),
                                               use_local_output=False))
    if is_plain_embedding(site.module):
        return CheckedTokenIds(LocalEmbedding())
    # CTRL scales the embedding's output in place
    return CheckedTokenIds(OwnedRowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()))


def build_lm_head(site: Site) -> ParallelStyle:
    """By default the logits are all-gathered, so the model returns ordinary full logits. With
    ``loss_parallel=True`` they stay a vocab-sharded DTensor for
    ``torch.distributed.tensor.parallel.loss_parallel`` and never exist whole on one rank.
    With ``sequence_dim`` its input arrives sharded along the sequence and is all-gathered."""
    args = site.args
    inputs = Shard(args.sequence_dim) if _sequence(args) else Replicate()
    if args.loss_parallel:
        return ColwiseParallel(input_layouts=inputs, output_layouts=Shard(-1), use_local_output=False)
    if not _sequence(args) and _plain_linear(site.module):
        return LocalLmHead()
    return OwnedColwiseParallel(input_layouts=inputs, output_layouts=Replicate())


def _by_layout(build):
    def layouts(site: Site) -> LayoutMap | None:
        built = build(site)
        return built.layouts(site.module) if isinstance(built, (LayoutParallel, LocalColwise, LocalRowwise)) else None

    return layouts


def _dims(by_type: dict[type, dict[str, int]]):
    def dims(site: Site) -> dict[str, int]:
        return next((d for kind, d in by_type.items() if isinstance(site.module, kind)), {})

    return dims


def _stored_whole(build, site: Site) -> int:
    """How many of the module's parameters hold rows stored whole on every rank (replicated kv heads,
    heads split balanced): the gradient of each is all-reduced in the backward."""
    return stored_whole(_by_layout(build)(site), site.tp)


def _colwise_collectives(site: Site) -> tuple[int, int]:
    """With sequence parallelism a plain input is all-gathered; a plain input's gradient is
    all-reduced, and so is that of every parameter with rows stored whole."""
    return (int(site.sequence_parallel and site.plain_input),
            int(site.plain_input) + _stored_whole(build_colwise, site))


COLWISE = Style(
    name="colwise", build=build_colwise, args=LayoutArgs, supports=(*LAYOUT_TYPES, nn.Embedding),
    doc="output features sharded; input replicated",
    reads=Act.REPLICATED, leaves=Act.FEATURES,
    sharded_dims=_dims({nn.Linear: {"weight": 0, "bias": 0}, nn.Embedding: {"weight": 1}}),
    layouts=_by_layout(build_colwise), collectives=_colwise_collectives,
    opens_block=lambda args: args == LayoutArgs(), uneven_ok=lambda args: True)

# an all-reduce, or a reduce-scatter with its all-gather in the backward. Uneven features (an
# intermediate size of 201 at TP=2) are exact where the input arrives as the local features the
# column-parallel linear before left; torch's RowwiseParallel (sequence parallel on a linear that is
# not plain, BitNet's) would infer the global size from an even split.
ROWWISE = Style(
    name="rowwise", build=build_rowwise, args=RowwiseArgs, supports=LAYOUT_TYPES,
    doc="input features sharded; partial outputs all-reduced (reduce-scattered under sequence parallelism)",
    reads=Act.FEATURES, leaves=lambda args: Act.SEQUENCE if _sequence(args) else Act.REPLICATED,
    sharded_dims=_dims({nn.Linear: {"weight": 1}}), layouts=_by_layout(build_rowwise),
    collectives=lambda site: (1, int(_sequence(site.args)) + _stored_whole(build_rowwise, site)),
    takes_sequence_dim=True, uneven_ok=lambda args: not _sequence(args) and args.local_output,
    computes_on_dtensors=lambda args: not args.local_output, reads_balanced_heads=True)

ROWWISE_INTO_SHARDED = Style(
    name="rowwise_into_sharded", build=lambda site: RowwiseIntoSharded(), supports=(nn.Linear,),
    doc="row-parallel linear whose all-reduced output feeds sharded computation (Mamba's x_proj): gradient summed",
    reads=Act.FEATURES, leaves=Act.REPLICATED, sharded_dims=_dims({nn.Linear: {"weight": 1}}),
    collectives=lambda site: (1, 1))

# A vocabulary of 32001 shards over 2 ranks as 16001 + 16000 rows: DTensor pads, which is exact.
EMBEDDING = Style(
    name="embedding", build=build_embedding, args=SequenceArgs, supports=(nn.Embedding,),
    doc="vocab-parallel embedding: rows (tokens) sharded, the looked-up vectors all-reduced",
    reads=Act.REPLICATED, leaves=lambda args: Act.SEQUENCE if _sequence(args) else Act.REPLICATED,
    sharded_dims=_dims({nn.Embedding: {"weight": 0}}), uneven_ok=lambda args: True,
    collectives=lambda site: (1, int(_sequence(site.args))), takes_sequence_dim=True)

LM_HEAD = Style(
    name="lm_head", build=build_lm_head, args=LmHeadArgs, supports=(nn.Linear,),
    doc="vocab-sharded output projection; logits gathered (or kept sharded with loss_parallel)",
    reads=lambda args: Act.SEQUENCE if _sequence(args) else Act.REPLICATED,
    leaves=lambda args: Act.FEATURES if args.loss_parallel else Act.REPLICATED,
    sharded_dims=_dims({nn.Linear: {"weight": 0, "bias": 0}}), uneven_ok=lambda args: not args.loss_parallel,
    collectives=lambda site: (int(not site.args.loss_parallel) + int(_sequence(site.args)), 1),
    takes_sequence_dim=True)
