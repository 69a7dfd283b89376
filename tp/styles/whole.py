"""Styles that keep a module whole on every rank: ``keep``, ``replicate`` and ``block_input``."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, distribute_module
from torch.distributed.tensor.parallel import ParallelStyle

from ..errors import PlanError
from .descriptor import Act, Args, PlainStyle, Style


class KeepWhole(PlainStyle):
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
    costs a single all-reduce in the backward. An input that needs no gradient (decoding under
    ``no_grad``) has none to sum and stays a plain tensor.

    The input is the first positional tensor argument, or the keyword argument ``kwarg`` when
    the block is called with keywords only (as Hugging Face decoder layers call attention).

    Keyword Args:
        kwarg (str): the keyword that carries the block input. Default: ``"hidden_states"``.
        dtensor_always (bool): keep an input that needs no gradient a replicated DTensor too, for
            a block in which a module computes on DTensors (``replicate``). Default: False.

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

    def __init__(self, *, kwarg: str = "hidden_states", dtensor_always: bool = False):
        self.kwarg, self.dtensor_always = kwarg, dtensor_always

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def replicate(x):
            if not isinstance(x, torch.Tensor):
                return x
            if isinstance(x, DTensor):
                # sequence parallel: one all-gather of the sequence, shared by all the linears
                return x if tuple(x.placements) == (Replicate(),) else x.redistribute(device_mesh, [Replicate()])
            if not x.requires_grad and not self.dtensor_always:
                return x  # no input gradient to sum (decoding under no_grad): its readers take it as it is
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
        return f"ReplicateBlockInput(kwarg={self.kwarg!r}, dtensor_always={self.dtensor_always!r})"


class ReplicatedRegion(PlainStyle):
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


class BlockInputArgs(Args):
    kwarg: str = Field("hidden_states", description="the keyword that carries the block input")
    dtensor_always: bool = Field(False, description="set by the plan: the input stays a replicated DTensor even "
                                 "where it needs no gradient, for a module inside that computes on DTensors")


KEEP = Style(
    name="keep", build=lambda site: KeepWhole(), doc="whole on every rank, no communication",
    reads=Act.REPLICATED, leaves=Act.AS_READ)

# DTensor sums the partial gradient at its output once
REPLICATE = Style(
    name="replicate", build=lambda site: ReplicatedRegion(),
    doc="whole on every rank as replicated DTensors inside a sharded block (gradients summed)",
    reads=Act.REPLICATED, leaves=Act.REPLICATED, collectives=lambda site: (0, 1),
    computes_on_dtensors=lambda args: True)

# With sequence parallelism its input is all-gathered once; its input gradient is all-reduced once.
# Inside another shared block its input is already a replicated DTensor: no collective.
BLOCK_INPUT = Style(
    name="block_input", build=lambda site: ReplicateBlockInput(kwarg=site.args.kwarg, dtensor_always=site.args.dtensor_always),
    args=BlockInputArgs,
    doc="a block's input replicated once for all its column-parallel linears",
    reads=lambda args: Act.REPLICATED, leaves=Act.REPLICATED, shares_input=True,
    collectives=lambda site: (int(site.sequence_parallel and site.plain_input), int(site.plain_input)))
