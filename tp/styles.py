"""The styles a plan can name, and the two small ParallelStyle subclasses torch lacks.

Every style is torch's own where torch has one (``ColwiseParallel``, ``RowwiseParallel``,
``SequenceParallel``); ``KeepWhole`` and ``ReplicateBlockInput`` are ours. A plan names a
style by its registry name, optionally with keyword arguments::

    "model.layers.*.self_attn.q_proj" = "colwise"
    "lm_head" = { style = "lm_head", loss_parallel = true }
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import (
    DTensor,
    Replicate,
    Shard,
    distribute_module,
    distribute_tensor,
)
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
)

from .errors import PlanError
from .experts import PackedExperts
from .gathered_norm import GatheredNorm
from .grad_sums import SumGrads, _SumGradOverRanks
from .head_inputs import SliceHeadInput
from .heads import Heads
from .layout_styles import CONVOLUTIONS, UNITS, ColwiseLayout, Conv1D, RowwiseLayout
from .shard_rows import ShardRows


class KeepWhole(ParallelStyle):
    """Keep a module whole on every rank: its parameters stay plain tensors, no communication.

    Inside a block whose input was replicated as a DTensor (see ``ReplicateBlockInput``), the
    module receives local tensors, so it runs exactly as unsharded. Its gradient with respect
    to that input is complete on every rank, which is what a ``Replicate`` placement means.

    Example::
        >>> # a MoE router stays whole; the experts around it may be sharded
        >>> parallelize_module(model, mesh, {"model.layers.0.mlp.gate": KeepWhole()})
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        module.register_forward_pre_hook(_inputs_to_local, with_kwargs=True)
        return module

    def __repr__(self) -> str:
        return "KeepWhole()"


def _inputs_to_local(module, args, kwargs):
    def local(x):
        return x.to_local() if isinstance(x, DTensor) else x

    return tuple(local(a) for a in args), {k: local(v) for k, v in kwargs.items()}


class ReplicateBlockInput(ParallelStyle):
    """Turn a block's input into one replicated DTensor that all its column-parallel linears share.

    This is Megatron's ``f`` operator placed once per block (with sequence parallelism, its
    all-gather of the sequence: a sequence-sharded DTensor input is gathered here once). When q, k and v (or gate and up)
    each wrap the same plain tensor, each one all-reduces its own input gradient in the
    backward; sharing one DTensor lets autograd sum the partial gradients first, so the block
    costs a single all-reduce in the backward.

    The input is the first positional tensor argument, or the keyword argument ``kwarg`` when
    the block is called with keywords only (as Hugging Face decoder layers call attention).

    Keyword Args:
        kwarg (str): the keyword that carries the block input. Default: ``"hidden_states"``.

    Example::
        >>> plan = {
        ...     "layers.0.self_attn": ReplicateBlockInput(),
        ...     "layers.0.self_attn.q_proj": ColwiseParallel(),
        ...     "layers.0.self_attn.k_proj": ColwiseParallel(),
        ...     "layers.0.self_attn.v_proj": ColwiseParallel(),
        ...     "layers.0.self_attn.o_proj": RowwiseParallel(),
        ... }
        >>> parallelize_module(model, mesh, plan)
    """

    def __init__(self, *, kwarg: str = "hidden_states"):
        self.kwarg = kwarg

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def replicate(x):
            if not isinstance(x, torch.Tensor):
                return x
            if isinstance(x, DTensor):
                # sequence parallel: one all-gather of the sequence, shared by all the linears
                return x if tuple(x.placements) == (Replicate(),) else x.redistribute(device_mesh, [Replicate()])
            return DTensor.from_local(x, device_mesh, [Replicate()], run_check=False)

        def hook(mod, args, kwargs):
            if args and isinstance(args[0], torch.Tensor):
                return (replicate(args[0]), *args[1:]), kwargs
            if isinstance(kwargs.get(self.kwarg), torch.Tensor):
                return args, {**kwargs, self.kwarg: replicate(kwargs[self.kwarg])}
            raise PlanError(
                f"block_input on {type(mod).__name__}: found no tensor as first argument nor as "
                f"keyword {self.kwarg!r}; set the style's kwarg to the name that carries the input"
            )

        module.register_forward_pre_hook(hook, with_kwargs=True)
        return module

    def __repr__(self) -> str:
        return f"ReplicateBlockInput(kwarg={self.kwarg!r})"


class ReplicatedRegion(ParallelStyle):
    """Run a module whole on every rank, on replicated DTensors, inside a tensor-parallel block.

    For a module that reads the replicated block input and feeds column-parallel linears (Yuan's
    localized filtering before q_proj/k_proj), the gradient arriving at its output is partial on
    each rank. With its parameters as replicated DTensors, DTensor sums that gradient before it
    reaches them, so they get the unsharded gradient. Its input becomes a replicated DTensor if
    it is not one yet, and its output stays a DTensor for the column-parallel linears.

    Example::
        >>> parallelize_module(model, mesh, {"layers.0.self_attn.lf_gate": ReplicatedRegion()})
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def input_fn(mod, inputs, mesh):
            first, *rest = inputs
            if isinstance(first, torch.Tensor) and not isinstance(first, DTensor):
                first = DTensor.from_local(first, mesh, [Replicate()], run_check=False)
            return first, *rest

        # With no partition function, distribute_module replicates every parameter.
        return distribute_module(module, device_mesh, input_fn=input_fn)

    def __repr__(self) -> str:
        return "ReplicatedRegion()"


class HeadNorm(ParallelStyle):
    """A norm over each attention head's features, inside the region where heads are sharded.

    Qwen3 normalises q and k per head with one weight of ``head_dim`` features shared by all
    heads; Cohere keeps one weight row per head. Either way a rank sees only its own heads,
    so a plain weight would get a silently incomplete gradient. Here the input is marked as
    sharded along the heads dimension; a shared weight becomes a replicated DTensor whose
    gradient DTensor sums over ranks, and a per-head weight (heads first) is sharded with the
    heads. The output goes back to a local tensor for the attention code that follows.

    Keyword Args:
        head_dim (int): the heads dimension of the norm's input. Default: 2, for
            ``[batch, seq, heads, head_features]``.

    Example::
        >>> parallelize_module(model, mesh, {"layers.0.self_attn.q_norm": HeadNorm(head_dim=2)})
    """

    def __init__(self, *, head_dim: int = 2):
        self.head_dim = head_dim

    def _partition(self, name, module, device_mesh):
        for p_name, param in list(module.named_parameters(recurse=False)):
            if param.dim() >= 2:
                placed = distribute_tensor(param, device_mesh, [Shard(0)], src_data_rank=self.src_data_rank)
            else:
                placed = DTensor.from_local(param, device_mesh, [Replicate()], run_check=False)
            module.register_parameter(p_name, nn.Parameter(placed, requires_grad=param.requires_grad))

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        placement = [Shard(self.head_dim)]

        def input_fn(mod, inputs, mesh):
            return DTensor.from_local(inputs[0], mesh, placement, run_check=False), *inputs[1:]

        def output_fn(mod, output, mesh):
            return output.to_local()

        return distribute_module(module, device_mesh, self._partition, input_fn, output_fn)

    def __repr__(self) -> str:
        return f"HeadNorm(head_dim={self.head_dim})"


def _needs_layout(module: nn.Module | None, parts, unit: str) -> bool:
    return parts != 1 or unit != "row" or (module is not None and not isinstance(module, (nn.Linear, nn.Embedding)))


def colwise(*, parts=1, unit: str = "row", heads: Heads | None = None, module: nn.Module | None = None) -> ParallelStyle:
    """Output features sharded; input replicated (torch's ColwiseParallel, or ColwiseLayout for
    fused/packed weights given ``parts``/``unit``, and for GPT-2's Conv1D)."""
    if _needs_layout(module, parts, unit):
        return ColwiseLayout(parts=parts, unit=unit, heads=heads)
    return ColwiseParallel()


class OwnedRowwiseParallel(RowwiseParallel):
    """torch's RowwiseParallel whose local output owns its memory.

    ``DTensor.to_local()`` returns a view made inside an autograd Function, which autograd
    forbids modifying in place; models add to a row-parallel output in place (Falcon's
    ``mlp_output += attention_output``). One copy of the output makes it an ordinary tensor.

    Example::
        >>> parallelize_module(model, mesh, {"layers.0.mlp.dense_4h_to_h": OwnedRowwiseParallel()})
    """

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        out = RowwiseParallel._prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh)
        return out.clone() if use_local_output else out


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
        whole = outputs.redistribute(placements=output_layouts).to_local()
        return _SumGradOverRanks.apply(whole, device_mesh.get_group())


def rowwise_into_sharded() -> ParallelStyle:
    """Row-parallel linear whose all-reduced output feeds sharded computation (Mamba's x_proj): gradient summed."""
    return RowwiseIntoSharded()


def rowwise(*, parts=1, unit: str = "row", sequence_dim: int | None = None, heads: Heads | None = None,
            module: nn.Module | None = None) -> ParallelStyle:
    """Input features sharded; partial outputs all-reduced (torch's RowwiseParallel, or
    RowwiseLayout for permuted inputs given ``parts``/``unit``, and for GPT-2's Conv1D).
    With ``sequence_dim`` the partial outputs are reduce-scattered along it instead."""
    if _needs_layout(module, parts, unit):
        return RowwiseLayout(parts=parts, unit=unit, heads=heads, sequence_dim=sequence_dim)
    if sequence_dim is not None:
        return RowwiseParallel(output_layouts=Shard(sequence_dim), use_local_output=False)
    return OwnedRowwiseParallel()


def keep() -> ParallelStyle:
    """Whole on every rank, no communication."""
    return KeepWhole()


def embedding(*, sequence_dim: int | None = None) -> ParallelStyle:
    """Vocab-parallel embedding: rows (tokens) sharded, the looked-up vectors all-reduced (or,
    with ``sequence_dim``, reduce-scattered along the sequence)."""
    if sequence_dim is not None:
        return RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(sequence_dim), use_local_output=False)
    return OwnedRowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())  # CTRL scales it in place


def lm_head(*, loss_parallel: bool = False, sequence_dim: int | None = None) -> ParallelStyle:
    """Vocab-sharded output projection.

    By default the logits are all-gathered, so the model returns ordinary full logits. With
    ``loss_parallel=True`` they stay a vocab-sharded DTensor for
    ``torch.distributed.tensor.parallel.loss_parallel`` and never exist whole on one rank.
    With ``sequence_dim`` its input arrives sharded along the sequence and is all-gathered.
    """
    inputs = Shard(sequence_dim) if sequence_dim is not None else Replicate()
    if loss_parallel:
        return ColwiseParallel(input_layouts=inputs, output_layouts=Shard(-1), use_local_output=False)
    return ColwiseParallel(input_layouts=inputs, output_layouts=Replicate())


def sequence_parallel(*, sequence_dim: int = 1) -> ParallelStyle:
    """Norms and dropout on sequence shards (torch's SequenceParallel)."""
    return SequenceParallel(sequence_dim=sequence_dim)


def sequence_shard(*, sequence_dim: int = 1) -> ParallelStyle:
    """A sync point after a module: its output leaves sharded along the sequence (a plain,
    replicated output is cut locally; a partial one is reduce-scattered)."""
    return PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(sequence_dim),
                               use_local_output=False)


def replicate() -> ParallelStyle:
    """Whole on every rank as replicated DTensors, inside a sharded block (gradients summed)."""
    return ReplicatedRegion()


def experts() -> ParallelStyle:
    """Packed 3-D experts (gate_up_proj, down_proj): every expert sharded on its intermediate features."""
    return PackedExperts()


def head_norm(*, head_dim: int = 2) -> ParallelStyle:
    """A norm applied per attention head inside the head-sharded region (q_norm / k_norm)."""
    return HeadNorm(head_dim=head_dim)


def sum_grads(*, params: tuple = ()) -> ParallelStyle:
    """Parameters used whole on sharded activations (per-head norms, learnable scalars): gradients summed."""
    return SumGrads(params=params)


def gathered_norm() -> ParallelStyle:
    """A norm over all features of a column-sharded tensor (OLMo 2's q_norm): gathered, run whole."""
    return GatheredNorm()


def shard_rows(*, params: tuple = (), lend: tuple = ()) -> ParallelStyle:
    """Own parameters with a row per head or channel (GPT-OSS sinks, Mamba's A_log): sharded on dim 0."""
    return ShardRows(params=params, lend=lend)


def mamba2_mixer() -> ParallelStyle:
    """A Mamba-2 mixer split by heads and groups: in_proj, conv1d and the scan per rank, out_proj row-parallel."""
    from .mamba2 import Mamba2Mixer

    return Mamba2Mixer()


def head_input(*, kwarg: str, index: int | None = None, head_dim: int = 0, heads: Heads | None = None) -> ParallelStyle:
    """Slice a per-head tensor argument of an attention (ALiBi bias) to this rank's query heads."""
    return SliceHeadInput(kwarg=kwarg, index=index, head_dim=head_dim, heads=heads.q if heads else None)


def block_input(*, kwarg: str = "hidden_states") -> ParallelStyle:
    """Replicate a block's input once for all its column-parallel linears."""
    return ReplicateBlockInput(kwarg=kwarg)


# Modules that compute ``x @ W^T + b``, whatever the weight's storage order.
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())
LAYOUT_TYPES = (*LINEAR_TYPES, *CONVOLUTIONS)

# Arguments that tp.apply supplies from the model; a plan never writes them.
CONTEXT_ARGS = ("heads", "module")


@dataclass(frozen=True)
class StyleDef:
    name: str
    build: Callable[..., ParallelStyle]
    supports: tuple[type[nn.Module], ...]  # empty: any module

    @property
    def summary(self) -> str:
        return (self.build.__doc__ or "").strip().splitlines()[0]


STYLES: dict[str, StyleDef] = {
    s.name: s
    for s in (
        StyleDef("colwise", colwise, (*LAYOUT_TYPES, nn.Embedding)),
        StyleDef("rowwise", rowwise, LAYOUT_TYPES),
        StyleDef("rowwise_into_sharded", rowwise_into_sharded, (nn.Linear,)),
        StyleDef("keep", keep, ()),
        StyleDef("replicate", replicate, ()),
        StyleDef("experts", experts, ()),
        StyleDef("embedding", embedding, (nn.Embedding,)),
        StyleDef("lm_head", lm_head, (nn.Linear,)),
        StyleDef("sequence_parallel", sequence_parallel, ()),
        StyleDef("sequence_shard", sequence_shard, ()),
        StyleDef("head_norm", head_norm, ()),
        StyleDef("head_input", head_input, ()),
        StyleDef("sum_grads", sum_grads, ()),
        StyleDef("shard_rows", shard_rows, ()),
        StyleDef("gathered_norm", gathered_norm, ()),
        StyleDef("mamba2_mixer", mamba2_mixer, ()),
        StyleDef("block_input", block_input, ()),
    )
}


def _check_layout_args(name: str, args: dict[str, Any]) -> None:
    parts, unit = args.get("parts", 1), args.get("unit", "row")
    if isinstance(parts, tuple):
        if not parts or any(p not in ("q", "kv") for p in parts):
            raise ValueError(f"style {name!r}: parts must be a number or a list of 'q' and 'kv', found {list(parts)}")
    elif not isinstance(parts, int) or isinstance(parts, bool) or parts < 1:
        raise ValueError(f"style {name!r}: parts must be a positive number or a list of 'q' and 'kv', found {parts!r}")
    if unit not in UNITS:
        raise ValueError(f"style {name!r}: unit must be one of {', '.join(UNITS)}, found {unit!r}")


@dataclass(frozen=True)
class StyleSpec:
    """A style name with its keyword arguments, as written in a plan."""

    name: str
    args: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, value: str | dict[str, Any]) -> StyleSpec:
        """``"colwise"`` or ``{style = "lm_head", loss_parallel = true}``; raises ValueError."""
        if isinstance(value, str):
            name, args = value, {}
        elif isinstance(value, dict) and "style" in value:
            args = dict(value)
            name = args.pop("style")
        else:
            raise ValueError(f"expected a style name or a table with a 'style' key, found {value!r}")
        if name not in STYLES:
            raise ValueError(f"unknown style {name!r}; allowed: {', '.join(STYLES)}")
        args = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}  # hashable
        _check_layout_args(name, args)
        params = {n: p for n, p in inspect.signature(STYLES[name].build).parameters.items() if n not in CONTEXT_ARGS}
        unknown = sorted(set(args) - set(params))
        if unknown:
            allowed = ", ".join(params) or "none"
            raise ValueError(f"style {name!r} takes no argument {', '.join(unknown)}; allowed: {allowed}")
        for key, given in args.items():
            default = params[key].default
            expected = int if key == "sequence_dim" else type(default)
            if key != "parts" and default is not inspect.Parameter.empty and expected is not type(None) \
                    and not isinstance(given, expected):
                raise ValueError(f"style {name!r}: {key} must be {expected.__name__}, found {given!r}")
        return cls(name, tuple(sorted(args.items())))

    def build(self, **context) -> ParallelStyle:
        """The style object; ``context`` (``heads``, ``module``) goes to factories that take it."""
        params = inspect.signature(STYLES[self.name].build).parameters
        given = {k: v for k, v in context.items() if k in params and k in CONTEXT_ARGS}
        return STYLES[self.name].build(**dict(self.args), **given)

    def check_module(self, path: str, module: nn.Module) -> None:
        supports = STYLES[self.name].supports
        if supports and not isinstance(module, supports):
            kinds = ", ".join(t.__name__ for t in supports)
            raise PlanError(
                f"{path}: style {self.name!r} supports {kinds}, but the module is a "
                f"{type(module).__name__}; choose another style for it or leave it out of the plan"
            )

    def __str__(self) -> str:
        if not self.args:
            return self.name
        def shown(v):
            return "[" + ", ".join(map(str, v)) + "]" if isinstance(v, tuple) else str(v)

        return f"{self.name}(" + ", ".join(f"{k}={shown(v)}" for k, v in self.args) + ")"
