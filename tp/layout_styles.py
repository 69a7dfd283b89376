"""Column- and row-parallel styles for weights with a ``Layout``: fused, packed, permuted, replicated.

torch's ColwiseParallel shards a weight's output rows contiguously, which is wrong for a
fused ``qkv_proj`` or ``gate_up_proj``, and it knows only ``nn.Linear``. These styles take
the rows each rank holds from a ``Layout`` (see tp/layouts.py), work for ``nn.Linear`` and
GPT-2's ``Conv1D`` (weight stored ``[in, out]``), and run the module on local shards:

* the weight is a DTensor whose global view is the original weight when a placement can
  describe the layout (``Shard`` or ``_StridedShard``), else a plain tensor of this rank's
  rows tagged with its layout (``LocalShard``) so ``tp.full_tensor`` can gather it back;
* during the module's forward its parameters are swapped for their local shards, so the
  module's own forward runs unchanged on them (nothing replaces ``forward``);
* rows replicated over ranks (kv heads with TP > kv heads) get their gradient summed over
  the replicas after it is accumulated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from .errors import PlanError
from .heads import Heads
from .layouts import Layout, Part

try:  # GPT-2 style models store linear weights as [in, out] in this class.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None

UNITS = ("row", "head", "head_dim", "group")


@dataclass(frozen=True)
class LocalShard:
    """Marks a plain parameter that holds only this rank's rows of ``layout`` along ``dim``."""

    layout: Layout
    dim: int
    mesh: DeviceMesh


def parameter_dims(module: nn.Module, kind: str) -> dict[str, int]:
    """The dimension of each parameter that holds output (``colwise``) or input (``rowwise``) features."""
    if isinstance(module, nn.Linear):
        return {"weight": 0, "bias": 0} if kind == "colwise" else {"weight": 1}
    if Conv1D is not None and isinstance(module, Conv1D):
        return {"weight": 1, "bias": 0} if kind == "colwise" else {"weight": 0}
    raise NotImplementedError(
        f"{kind} with a layout supports nn.Linear and transformers' Conv1D, not {type(module).__name__}")


def build_layout(size: int, *, parts, unit: str, heads: Heads | None, where: str) -> Layout:
    """The layout of a dimension of ``size`` rows.

    ``parts`` is a number of equal parts (gate and up: 2) or a list of head kinds, ``"q"``
    for query heads and ``"kv"`` for key/value heads (phi3 ``qkv_proj``: ``["q", "kv", "kv"]``).
    Equal parts are split in units of ``unit``: single rows, query ``head``s (all the rows of
    one head, e.g. its q, k and v when interleaved per head), ``head_dim`` rows (one head's
    q, k or v) or kv ``group``s (a kv head with its query heads, as Falcon packs them).
    """
    if isinstance(parts, (list, tuple)):
        if heads is None:
            raise PlanError(f"{where}: parts {list(parts)} need the model's head counts, which its config lacks")
        kinds = {"q": (heads.q, False), "kv": (heads.kv, True)}
        unknown = [p for p in parts if p not in kinds]
        if unknown:
            raise PlanError(f"{where}: unknown part {unknown[0]!r}; parts are 'q' and 'kv', or a number")
        layout = Layout(tuple(Part(kinds[p][0], heads.dim, kinds[p][1], name=f"{p} heads") for p in parts))
        if layout.size != size:
            raise PlanError(f"{where}: parts {list(parts)} make {layout.size} rows ({heads}), "
                            f"but the dimension has {size}; check the family's parts")
        return layout
    if unit not in UNITS:
        raise PlanError(f"{where}: unknown unit {unit!r}; units are {', '.join(UNITS)}")
    if unit != "row" and heads is None:
        raise PlanError(f"{where}: unit {unit!r} needs the model's head counts, which its config lacks")
    total = {"row": size, "head": heads and heads.q, "group": heads and heads.kv,
             "head_dim": heads and size // heads.dim}[unit]
    if size % total or total % parts:
        raise PlanError(f"{where}: {size} rows do not split into {parts} parts of whole {unit}s ({total} {unit}s)")
    units = total // parts
    return Layout(tuple(Part(units, size // total, name=f"part {i} ({units} {unit}s)") for i in range(parts)))


def _place(module: nn.Module, name: str, layout: Layout, dim: int, mesh: DeviceMesh) -> None:
    param = getattr(module, name)
    tp, rank = mesh.size(), mesh.get_local_rank()
    placement = layout.placement(dim, tp)
    if placement is not None:
        placed = nn.Parameter(distribute_tensor(param.detach(), mesh, [placement], src_data_rank=None),
                              requires_grad=param.requires_grad)
    else:
        placed = nn.Parameter(layout.shard(param.detach(), dim, tp, rank), requires_grad=param.requires_grad)
        placed._tp_local_shard = LocalShard(layout, dim, mesh)
        if layout.replicated_rows(tp, rank) and placed.requires_grad:
            group = mesh.get_group()
            placed.register_post_accumulate_grad_hook(lambda p: layout.sum_replicated(p.grad, dim, group))
    module.register_parameter(name, placed)


def _swap_in_local(module: nn.Module, names, zero: tuple[str, ...] = ()) -> dict[str, nn.Parameter]:
    """Give the module's forward the local shards of its DTensor parameters (zeros for ``zero``)."""
    stash = {}
    for name in names:
        param = module._parameters.get(name)
        if param is None:
            continue
        stash[name] = param
        if name in zero:
            local = param.to_local() if isinstance(param, DTensor) else param
            module._parameters[name] = torch.zeros_like(local).detach()
        elif isinstance(param, DTensor):
            module._parameters[name] = param.to_local()
    return stash


def _restore(module: nn.Module, stash: dict[str, nn.Parameter]) -> None:
    module._parameters.update(stash)


def _first_input(args, kwargs):
    if args:
        return args[0], lambda x: ((x, *args[1:]), kwargs)
    key = next(iter(kwargs))
    return kwargs[key], lambda x: (args, {**kwargs, key: x})


class ColwiseLayout(ParallelStyle):
    """Column parallel for a weight whose output features follow a layout: fused, packed or replicated.

    Each rank computes the output features of its own slice of every part, e.g. its q, k and
    v heads of a fused ``qkv_proj``. The input is replicated; its gradient is partial on each
    rank and is summed where the input was replicated (see ``ReplicateBlockInput``), or here
    when the input is a plain tensor. The output is a local tensor.

    Keyword Args:
        parts: equal parts (an int) or head kinds (``["q", "kv", "kv"]``); see ``build_layout``.
        unit: ``"row"``, ``"head"`` or ``"group"``, the indivisible unit of equal parts.
        heads (Heads): the model's head counts, needed by head parts and units.

    Example::
        >>> heads = Heads(q=32, kv=8, dim=96)     # phi3-style GQA
        >>> style = ColwiseLayout(parts=["q", "kv", "kv"], heads=heads)
        >>> parallelize_module(model, mesh, {"layers.*.self_attn.qkv_proj": style})
    """

    kind = "colwise"

    def __init__(self, *, parts=1, unit: str = "row", heads: Heads | None = None):
        super().__init__()
        self.parts, self.unit, self.heads = parts, unit, heads

    def layouts(self, module: nn.Module) -> dict[str, tuple[Layout, int]]:
        """Parameter name -> (layout, dimension) for the parameters this style shards."""
        where = f"{type(module).__name__} ({self.kind})"
        found = {}
        for name, dim in parameter_dims(module, self.kind).items():
            param = getattr(module, name, None)
            if param is not None:
                found[name] = (build_layout(param.shape[dim], parts=self.parts, unit=self.unit,
                                            heads=self.heads, where=where), dim)
        return found

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for name, (layout, dim) in self.layouts(module).items():
            _place(module, name, layout, dim, device_mesh)
            if name == "weight" and Conv1D is not None and isinstance(module, Conv1D):
                module.nf = len(layout.rows(device_mesh.size(), device_mesh.get_local_rank()))  # its output view

        def before(mod, args, kwargs):
            x, rebuild = _first_input(args, kwargs)
            if not isinstance(x, DTensor):
                # Replicate first so that the input gradient, partial on each rank, is summed.
                x = DTensor.from_local(x, device_mesh, [Replicate()], run_check=False)
            mod._tp_stash = _swap_in_local(mod, ("weight", "bias"))
            return rebuild(x.to_local(grad_placements=[Partial()]))

        def after(mod, args, kwargs, output):
            _restore(mod, mod.__dict__.pop("_tp_stash"))
            return output

        module.register_forward_pre_hook(before, with_kwargs=True)
        module.register_forward_hook(after, with_kwargs=True)
        return module

    def __repr__(self) -> str:
        return f"{type(self).__name__}(parts={self.parts!r}, unit={self.unit!r})"


class RowwiseLayout(ColwiseLayout):
    """Row parallel for a weight whose input features follow a layout (the mirror of ``ColwiseLayout``).

    The input holds this rank's features, in the layout's local order, as a ``ColwiseLayout``
    produced them. Each rank computes a partial output, the partial outputs are all-reduced,
    and the bias (replicated) is added once, after the reduction.

    Example::
        >>> # Yuan 2.0: v_proj and o_proj hold their heads in two halves
        >>> parallelize_module(model, mesh, {
        ...     "self_attn.v_proj": ColwiseLayout(parts=2, unit="head", heads=heads),
        ...     "self_attn.o_proj": RowwiseLayout(parts=2, unit="head", heads=heads)})
    """

    kind = "rowwise"

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        tp = device_mesh.size()
        for name, (layout, dim) in self.layouts(module).items():
            if layout.placement(dim, tp) is None:
                raise PlanError(f"{type(module).__name__}: rowwise needs every part split over the ranks, "
                                f"but {layout} replicates some of them at tp={tp}")
            _place(module, name, layout, dim, device_mesh)
        bias = getattr(module, "bias", None)
        if bias is not None:
            module.register_parameter("bias", nn.Parameter(
                distribute_tensor(bias.detach(), device_mesh, [Replicate()], src_data_rank=None),
                requires_grad=bias.requires_grad))

        def before(mod, args, kwargs):
            x, rebuild = _first_input(args, kwargs)
            mod._tp_stash = _swap_in_local(mod, ("weight", "bias"), zero=("bias",))
            return rebuild(x.to_local() if isinstance(x, DTensor) else x)

        def after(mod, args, kwargs, output):
            stash = mod.__dict__.pop("_tp_stash")
            _restore(mod, stash)
            total = DTensor.from_local(output, device_mesh, [Partial()], run_check=False)
            total = total.redistribute(device_mesh, [Replicate()]).to_local()
            return total + stash["bias"].to_local() if "bias" in stash else total

        module.register_forward_pre_hook(before, with_kwargs=True)
        module.register_forward_hook(after, with_kwargs=True)
        return module
