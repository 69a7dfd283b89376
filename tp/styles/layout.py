"""Column- and row-parallel styles for weights with a ``Layout``: fused, packed, permuted, replicated.

torch's ColwiseParallel shards a weight's output rows contiguously, which is wrong for a
fused ``qkv_proj`` or ``gate_up_proj``, and it knows only ``nn.Linear``. These styles take
the rows each rank holds from a ``Layout`` (see tp/sharding/layouts.py), work for ``nn.Linear`` and
GPT-2's ``Conv1D`` (weight stored ``[in, out]``) and ``nn.Conv1d``/``nn.Conv2d`` (channels;
pytorch#133221), and run the module on local shards:

* the weight is a DTensor whose global view is the original weight: sharded for one part, or
  one DTensor per part for a fused weight (tp/sharding/fused.py);
* during the module's forward its parameters are swapped for their local shards, so the
  module's own forward runs unchanged on them (nothing replaces ``forward``): DTensor's own
  sharding rules cannot do this for strided layouts, nor for convolutions, whose rules ignore
  the weight's placement (a channel-sharded weight gives a shape error or a wrong sum);
* rows replicated over ranks (kv heads with TP > kv heads) get their gradient summed over
  the replicas after it is accumulated.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import (
    DTensor,
    Partial,
    Replicate,
    Shard,
    distribute_tensor,
)
from torch.distributed.tensor.parallel import ParallelStyle

from ..errors import PlanError, SizeError
from ..sharding.collectives import mesh_group, replicated_input, to_local
from ..sharding.heads import Heads
from ..sharding.layouts import Layout, Part
from ..sharding.lending import lend_local_params, local_of, take_back_params
from ..sharding.tags import local_rows, module_layouts, place_parameter

try:  # GPT-2 style models store linear weights as [in, out] in this class.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None

UNITS = ("row", "head", "head_dim", "group")


CONVOLUTIONS = (nn.Conv1d, nn.Conv2d)


def parameter_dims(module: nn.Module, kind: str, who: str | None = None) -> dict[str, int]:
    """The dimension of each parameter that holds output (``colwise``) or input (``rowwise``) features.

    ``who`` names the style in errors (default: ``kind``)."""
    who = who or kind
    if isinstance(module, nn.Embedding) and kind == "colwise":  # one column per head (T5's relative bias)
        return {"weight": 1}
    if isinstance(module, (nn.Linear, *CONVOLUTIONS)):
        if isinstance(module, CONVOLUTIONS) and module.groups != 1:
            raise NotImplementedError(
                f"{who}: grouped or depthwise convolutions are not supported ({module} has "
                f"groups={module.groups}); leave it out of the plan to keep it whole on every rank")
        return {"weight": 0, "bias": 0} if kind == "colwise" else {"weight": 1}
    if Conv1D is not None and isinstance(module, Conv1D):
        return {"weight": 1, "bias": 0} if kind == "colwise" else {"weight": 0}
    raise NotImplementedError(
        f"{who} supports nn.Linear, transformers' Conv1D, nn.Conv1d and nn.Conv2d, but the module is a "
        f"{type(module).__name__}; choose another style for it or leave it out of the plan")


def feature_dim(module: nn.Module, x: torch.Tensor) -> int:
    """Where the features are in the module's input and output: channels for convolutions
    (dim 1, or 0 unbatched), the last dimension otherwise."""
    if isinstance(module, CONVOLUTIONS):
        return x.dim() - len(module.kernel_size) - 1
    return x.dim() - 1


def heads_layout(size: int, heads: Heads | None) -> Layout | None:
    """The layout of ``size`` sharded features or rows when they are all the query heads of an
    attention (q_proj, o_proj, GPT-2's c_proj) or one value per query head (GPT-OSS's sinks, T5's
    relative attention bias): whole heads, balanced where they do not divide (6 over 4 ranks as 2,
    2, 1, 1). None for others, split as ``torch.chunk`` splits them (and GQA kv heads, which
    ``tp.checks.sizes`` checks divide)."""
    if heads is not None and size in (heads.q * heads.dim, heads.q):
        return heads.query_layout(size // heads.q)
    return None


def build_layout(size: int, *, parts, unit: str, heads: Heads | None, where: str, may_be_empty: bool = False
                 ) -> Layout:
    """The layout of a dimension of ``size`` rows.

    ``parts`` is a number of equal parts (gate and up: 2) or a list of head kinds, ``"q"``
    for query heads and ``"kv"`` for key/value heads (phi3 ``qkv_proj``: ``["q", "kv", "kv"]``).
    Equal parts are split in units of ``unit``: single rows, query ``head``s (all the rows of
    one head, e.g. its q, k and v when interleaved per head), ``head_dim`` rows (one head's
    q, k or v) or kv ``group``s (a kv head with its query heads, as Falcon packs them). One part
    of single rows that are all the query heads is split as whole heads (``heads_layout``); other
    single rows split as ``torch.chunk`` does, leaving the last ranks none only where
    ``may_be_empty`` (a linear's features, not a convolution's channels).
    """
    if isinstance(parts, (list, tuple)):
        if heads is None:
            raise PlanError(f"{where}: parts {list(parts)} need the model's head counts, which its config lacks")
        kinds = {"q": (heads.q, False), "kv": (heads.kv, True)}
        unknown = [p for p in parts if p not in kinds]
        if unknown:
            raise PlanError(f"{where}: unknown part {unknown[0]!r}; parts are 'q' and 'kv', or a number")
        # query heads alone in a layout may split unevenly, balanced; their kv heads follow by need
        layout = Layout(tuple(Part(kinds[p][0], heads.dim, kinds[p][1], name=f"{p} heads", unit="heads",
                                   serves=heads.q if p == "kv" else 0, balanced=p == "q")
                              for p in parts))
        if layout.size != size:
            raise PlanError(f"{where}: parts {list(parts)} make {layout.size} rows ({heads}), "
                            f"but the dimension has {size}; check the family's parts")
        return layout
    if unit not in UNITS:
        raise PlanError(f"{where}: unknown unit {unit!r}; units are {', '.join(UNITS)}")
    if parts == 1 and unit == "row" and (layout := heads_layout(size, heads)) is not None:
        return layout
    if unit != "row" and heads is None:
        raise PlanError(f"{where}: unit {unit!r} needs the model's head counts, which its config lacks")
    total = {"row": size, "head": heads and heads.q, "group": heads and heads.kv,
             "head_dim": heads and size // heads.dim}[unit]
    if size % total or total % parts:
        raise PlanError(f"{where}: {size} rows do not split into {parts} parts of whole {unit}s ({total} {unit}s)")
    units = total // parts
    word = {"row": "rows", "head": "heads", "head_dim": "head_dim blocks", "group": "kv groups"}[unit]
    # single rows (features, channels) of one part may split unevenly, as torch.chunk does
    # Falcon's groups, [q heads of the group; k; v]: at tp > groups a group's ranks share its k and v
    grouped = unit == "group" and parts == 1 and size == heads.kv * (heads.q // heads.kv + 2) * heads.dim
    group_q = heads.q // heads.kv if grouped else 0
    # whole query heads, each with its q, k and v (Bloom), split balanced where they do not divide
    balanced = unit == "head" and parts == 1
    return Layout(tuple(Part(units, size // total, name=f"part {i}", unit=word, uneven=unit == "row", group_q=group_q,
                             balanced=balanced, may_be_empty=may_be_empty) for i in range(parts)))


def first_input(style: str, module: nn.Module, args: tuple, kwargs: dict):
    """A forward pre-hook's input (the first positional argument, else the first keyword one) and
    a function that puts a replacement back in its place, as ``(args, kwargs)``."""
    if args:
        return args[0], lambda y: ((y, *args[1:]), kwargs)
    if kwargs:
        key = next(iter(kwargs))
        return kwargs[key], lambda y: (args, {**kwargs, key: y})
    raise TypeError(f"{style}: {type(module).__name__} was called without an input")


class LayoutParallel(ParallelStyle):
    """What the column and row styles share: layouts, parameter placement, lending local shards.

    A forward pre-hook lends the module's own ``forward`` the local shards of its parameters
    for the duration of the call; a forward hook (``always_call``, so it runs even when
    forward raises) gives the parameters back and finishes the output.
    """

    kind: str

    def __init__(self, *, parts=1, unit: str = "row", heads: Heads | None = None, use_local_output: bool = True,
                 sequence_dim: int | None = None):
        super().__init__()
        self.parts, self.unit, self.heads, self.use_local_output = parts, unit, heads, use_local_output
        self.sequence_dim = sequence_dim

    def layouts(self, module: nn.Module) -> dict[str, tuple[Layout, int]]:
        """Parameter name -> (layout, dimension) for the parameters this style shards."""
        where = f"{type(module).__name__} ({self.kind})"
        found = {}
        for name, dim in parameter_dims(module, self.kind, type(self).__name__).items():
            param = getattr(module, name, None)
            if param is not None:
                # a linear runs a rank with no features (an empty weight); a convolution cannot
                found[name] = (build_layout(param.shape[dim], parts=self.parts, unit=self.unit, heads=self.heads,
                                            where=where, may_be_empty=not isinstance(module, CONVOLUTIONS)), dim)
        return found

    def _check_sizes(self, module: nn.Module, layouts, tp: int) -> None:
        layout, _ = layouts["weight"]
        problems = layout.problems(tp)
        if not problems:
            return
        what = {"colwise": "output", "rowwise": "input"}[self.kind]
        what += " channels" if isinstance(module, CONVOLUTIONS) else " features"
        detail = (f"{layout.size} {what} do not divide" if len(layout.parts) == 1 and layout.parts[0].unit_rows == 1
                  else "; ".join(problems))
        raise SizeError(f"{type(self).__name__}: {module}: {detail} by the tensor-parallel size {tp}; "
                              "use a tensor-parallel size that divides them, or leave the module out of the plan")

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        layouts = self.layouts(module)
        self._check_sizes(module, layouts, device_mesh.size())
        for name, (layout, dim) in layouts.items():
            place_parameter(module, name, layout, dim, device_mesh)
        self._place_rest(module, device_mesh, layouts)
        module.register_forward_pre_hook(partial(self._lend_local, device_mesh), with_kwargs=True)
        module.register_forward_hook(partial(self._take_back, device_mesh), always_call=True)
        return module

    def _place_rest(self, module: nn.Module, device_mesh: DeviceMesh, layouts) -> None:
        """Place the parameters no layout covers (the row style's bias)."""

    def _lend_local(self, device_mesh, module, args, kwargs):
        x, rebuild = first_input(type(self).__name__, module, args, kwargs)
        x = self._local_input(module, x, device_mesh)
        lend_local_params(module, ("weight", "bias"), partial(self._local_param, module))
        return rebuild(x)

    def _take_back(self, device_mesh, module, args, output):
        lent = take_back_params(module)
        if lent is None or output is None:  # nothing lent, or forward raised: its error propagates
            return None
        return self._finish_output(module, output, lent, device_mesh)

    def _local_param(self, module: nn.Module, name: str, param: torch.Tensor | None) -> torch.Tensor | None:
        return local_rows(module, name, param)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(parts={self.parts!r}, unit={self.unit!r})"


class ColwiseLayout(LayoutParallel):
    """Column parallel for a weight whose output features follow a layout: fused, packed or replicated.

    Each rank computes the output features of its own slice of every part, e.g. its q, k and
    v heads of a fused ``qkv_proj``. The input is replicated; its gradient is partial on each
    rank and is summed where the input was replicated (see ``ReplicateBlockInput``), or here
    when the input is a plain tensor. Works for ``nn.Linear``, GPT-2's ``Conv1D`` and
    ``nn.Conv1d``/``nn.Conv2d`` (output channels).

    Keyword Args:
        parts: equal parts (an int) or head kinds (``["q", "kv", "kv"]``); see ``build_layout``.
        unit: ``"row"``, ``"head"``, ``"head_dim"`` or ``"group"``, the indivisible unit of equal parts.
        heads (Heads): the model's head counts, needed by head parts and units.
        use_local_output (bool): return this rank's features as a plain tensor. Default: True.

    Example::
        >>> heads = Heads(q=32, kv=8, dim=96)     # phi3-style GQA
        >>> style = ColwiseLayout(parts=["q", "kv", "kv"], heads=heads)
        >>> parallelize_module(model, mesh, {"layers.*.self_attn.qkv_proj": style})
    """

    kind = "colwise"

    def _place_rest(self, module, device_mesh, layouts):
        if Conv1D is not None and isinstance(module, Conv1D):  # Conv1D views its output with nf
            layout, _ = layouts["weight"]
            module.nf = len(layout.rows(device_mesh.size(), device_mesh.get_local_rank()))

    def _local_input(self, module, x, device_mesh) -> torch.Tensor:
        return replicated_input(x, mesh_group(device_mesh))

    def _finish_output(self, module, output, lent, device_mesh):
        if self.use_local_output:
            return output
        layout = module_layouts(module)["weight"].layout
        placement = layout.placement(feature_dim(module, output), device_mesh.size())
        if placement is None:
            raise PlanError(f"{type(self).__name__}: {type(module).__name__}'s layout has no DTensor placement "
                            "(replicated kv heads or unequal parts); use use_local_output=True")
        return DTensor.from_local(output, device_mesh, [placement], run_check=False)


class GivenColwiseLayout(ColwiseLayout):
    """ColwiseLayout with its layout given whole, for a module whose parent knows its parts (a Mamba
    mixer's ``in_proj``: ``[x | gate]``, or Mamba-2's ``[z | x | B | C | dt]``).

    Keyword Args:
        gathered_input (bool): the input is the sequence the parent all-gathered into a plain tensor
            whose gradient, partial on each rank, the parent reduce-scatters (``tp.styles.mixer``):
            it is read as it is, with no ``f``, which would sum that gradient twice. Default: False.

    Example::
        >>> layout = Layout((Part(256, 1, name="x"), Part(256, 1, name="gate")))
        >>> parallelize_module(model, mesh, {"layers.0.mixer.in_proj": GivenColwiseLayout(layout)})
    """

    def __init__(self, layout: Layout, *, gathered_input: bool = False):
        super().__init__()
        self.layout, self.gathered_input = layout, gathered_input

    def layouts(self, module: nn.Module) -> dict[str, tuple[Layout, int]]:
        return {name: (self.layout, 0) for name in ("weight", "bias") if getattr(module, name, None) is not None}

    def _local_input(self, module, x, device_mesh) -> torch.Tensor:
        return x if self.gathered_input else super()._local_input(module, x, device_mesh)

    def __repr__(self) -> str:
        return f"GivenColwiseLayout({self.layout!r}, gathered_input={self.gathered_input})"


class RowwiseLayout(LayoutParallel):
    """Row parallel for a weight whose input features follow a layout (the mirror of ``ColwiseLayout``).

    The input holds this rank's features, in the layout's local order, as a ``ColwiseLayout``
    produced them. Each rank computes a partial output without the bias, the partial outputs
    are all-reduced, and the bias (replicated) is added once, after the reduction.

    Example::
        >>> # Yuan 2.0: v_proj and o_proj hold their heads in two halves
        >>> parallelize_module(model, mesh, {
        ...     "self_attn.v_proj": ColwiseLayout(parts=2, unit="head", heads=heads),
        ...     "self_attn.o_proj": RowwiseLayout(parts=2, unit="head", heads=heads)})
    """

    kind = "rowwise"

    def _place_rest(self, module, device_mesh, layouts):
        bias = getattr(module, "bias", None)
        if bias is not None:
            module.register_parameter("bias", nn.Parameter(
                distribute_tensor(bias.detach(), device_mesh, [Replicate()], src_data_rank=None),
                requires_grad=bias.requires_grad))

    def _local_param(self, module, name, param):
        if name == "bias" and param is not None:  # added once after the all-reduce, not to every rank's partial sum
            return torch.zeros_like(local_of(param)).detach()
        return super()._local_param(module, name, param)

    def _local_input(self, module, x, device_mesh) -> torch.Tensor:
        layout = module_layouts(module)["weight"].layout
        features = feature_dim(module, x)
        if isinstance(x, DTensor):
            wanted = layout.placement(features, device_mesh.size())
            if wanted is None:  # rows stored whole (heads split balanced): only a local input says which
                raise PlanError(f"{type(self).__name__}: {module} reads its input features as {layout} lays "
                                f"them out, which no DTensor placement describes, but got a DTensor "
                                f"({x.placements}); give it the local output of a column-parallel module")
            if tuple(x.placements) != (wanted,):
                x = x.redistribute(device_mesh, [wanted])
            x = x.to_local()
        expected = len(layout.rows(device_mesh.size(), device_mesh.get_local_rank()))
        if features < 0 or x.shape[features] != expected:
            raise ValueError(
                f"{type(self).__name__}: {module} expects this rank's {expected} of its {layout.size} input "
                f"features (the local output of a column-parallel module), but got an input of shape {tuple(x.shape)}")
        return x

    def _finish_output(self, module, output, lent, device_mesh):
        total = DTensor.from_local(output, device_mesh, [Partial()], run_check=False)
        if self.sequence_dim is not None:  # sequence parallel: reduce-scatter, stay a DTensor
            total = total.redistribute(device_mesh, [Shard(self.sequence_dim)])
            if "bias" in lent:
                total = total + lent["bias"]
            return total
        total = to_local(total.redistribute(device_mesh, [Replicate()]))
        if "bias" in lent:
            shape = [1] * total.dim()
            shape[feature_dim(module, total)] = -1
            total = total + lent["bias"].to_local().view(shape)
        if self.use_local_output:
            return total
        return DTensor.from_local(total, device_mesh, [Replicate()], run_check=False)
