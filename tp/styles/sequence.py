"""The styles sequence parallelism adds: norms and dropout on sequence shards, sync points, and
blocks that compute on the gathered sequence as a whole (a MoE module with its router and experts)."""

from __future__ import annotations

from dataclasses import replace

from pydantic import Field
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ParallelStyle,
    PrepareModuleOutput,
    SequenceParallel,
)

from ..errors import PlanError
from .descriptor import Act, Args, Style
from .layout import first_input
from .linear import COLWISE, OwnedColwiseParallel
from .whole import ReplicateBlockInput


class SequenceDimArgs(Args):
    sequence_dim: int = 1


class GatheredWholeArgs(SequenceDimArgs):
    kwargs: tuple[str, ...] = Field((), description="keyword inputs all-gathered besides the first input")


class SequenceBlockArgs(SequenceDimArgs):
    kwarg: str = Field("hidden_states", description="the keyword that carries the block input")
    partial_output: bool = Field(True, description="the block leaves partial sums (reduce-scattered); "
                                 "false: complete ones, cut locally")


class GatheredWhole(ParallelStyle):
    """Run a module kept whole on the gathered sequence, between sequence-sharded activations.

    A module that no rank shards, but that reads the sequence-sharded residual stream (Zamba2's
    transformer block shared by its hybrid layers, which reads the stream and the embeddings), needs
    the whole sequence: its input and the keyword inputs named in ``kwargs`` are all-gathered into
    plain tensors, and it computes exactly as unsharded, on every rank. Its output is complete on
    every rank (a later ``sequence_shard`` cuts it), so the gradient reaching its inputs is complete
    too and is only cut locally in the backward: no collective.

    Keyword Args:
        kwargs (tuple[str, ...]): keyword inputs gathered besides the first input. Default: none.
        sequence_dim (int): the sequence dimension of those inputs. Default: 1.

    Example::
        >>> plan = {"model.layers.6.shared_transformer": GatheredWhole(kwargs=("original_hidden_states",)),
        ...         "model.layers.6.linear": PrepareModuleOutput(output_layouts=Replicate(),
        ...                                                      desired_output_layouts=Shard(1))}
        >>> parallelize_module(model, mesh, plan)
    """

    def __init__(self, *, kwargs: tuple[str, ...] = (), sequence_dim: int = 1):
        self.kwargs, self.sequence_dim = tuple(kwargs), sequence_dim

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def gather(where: str, x):
            if not isinstance(x, DTensor) or tuple(x.placements) != (Shard(self.sequence_dim),):
                raise PlanError(f"sequence_gather on {type(module).__name__}: its {where} should be the residual "
                                f"stream sharded along dimension {self.sequence_dim}, but is "
                                f"{x.placements if isinstance(x, DTensor) else type(x).__name__}")
            return x.redistribute(device_mesh, [Replicate()]).to_local(grad_placements=[Replicate()])

        def hook(mod, args, kwargs):
            x, rebuild = first_input("sequence_gather", mod, args, kwargs)
            args, kwargs = rebuild(gather("input", x))
            return args, {k: gather(k, v) if k in self.kwargs and v is not None else v for k, v in kwargs.items()}

        module.register_forward_pre_hook(hook, with_kwargs=True)
        return module

    def __repr__(self) -> str:
        return f"GatheredWhole(kwargs={self.kwargs!r}, sequence_dim={self.sequence_dim})"


class GatheredSequenceBlock(ParallelStyle):
    """Run a module on the whole sequence between two sequence-sharded activations.

    For a module whose children see the tokens flattened (a MoE block: the router and the packed
    experts read ``[batch * sequence, hidden]``), the sequence cannot stay sharded inside. As
    Megatron does for MoE under sequence parallelism, the block's input is all-gathered once for
    every child (a replicated DTensor, as ``block_input`` makes it) and its output, partial sums
    (a DTensor) or complete (a plain tensor), leaves sharded along the sequence (reduce-scattered,
    or cut locally). The
    backward mirrors it: the output gradient is all-gathered, the summed input gradient
    reduce-scattered.

    Keyword Args:
        sequence_dim (int): the sequence dimension of the block's input and output. Default: 1.
        kwarg (str): the keyword that carries the input when the block gets no positional one.

    Example::
        >>> plan = {
        ...     "layers.0.mlp": GatheredSequenceBlock(),
        ...     "layers.0.mlp.gate": KeepWhole(),
        ...     "layers.0.mlp.experts": PackedExperts(partial_output=True),
        ... }
        >>> parallelize_module(model, mesh, plan)
    """

    def __init__(self, *, sequence_dim: int = 1, kwarg: str = "hidden_states"):
        self.sequence_dim = sequence_dim
        self.kwarg = kwarg

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        ReplicateBlockInput(kwarg=self.kwarg)._apply(module, device_mesh)
        # An output that is already a DTensor keeps its placement (the layout below is only
        # for a plain output, replicated); it is redistributed to sequence shards.
        return PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(self.sequence_dim),
                                   use_local_output=False)._apply(module, device_mesh)

    def __repr__(self) -> str:
        return f"GatheredSequenceBlock(sequence_dim={self.sequence_dim}, kwarg={self.kwarg!r})"


SEQUENCE_PARALLEL = Style(
    name="sequence_parallel", build=lambda site: SequenceParallel(sequence_dim=site.args.sequence_dim),
    args=SequenceDimArgs, doc="norms and dropout on sequence shards (torch's SequenceParallel)",
    reads=Act.SEQUENCE, leaves=Act.SEQUENCE)

def _output_gradient_gathered(site) -> int:
    """A module whose parameters are all frozen (Whisper's fixed sinusoidal positions) reads no
    gradient for its output, so nothing is gathered in the backward; any other one is."""
    params = list(site.module.parameters())
    return int(not params or any(p.requires_grad for p in params))


# A replicated output is cut locally; a partial one is reduce-scattered. Its gradient is all-gathered.
SEQUENCE_SHARD = Style(
    name="sequence_shard",
    build=lambda site: PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(
        site.args.sequence_dim), use_local_output=False),
    args=SequenceDimArgs, doc="a sync point after a module: its output leaves sharded along the sequence",
    reads=Act.REPLICATED, leaves=Act.SEQUENCE, collectives=lambda site: (0, _output_gradient_gathered(site)))

# Forward: one all-gather per input; backward: none (the complete gradient is cut locally).
SEQUENCE_GATHER = Style(
    name="sequence_gather",
    build=lambda site: GatheredWhole(kwargs=site.args.kwargs, sequence_dim=site.args.sequence_dim),
    args=GatheredWholeArgs,
    doc="a module kept whole on the gathered sequence: its sequence-sharded inputs all-gathered (Zamba2's "
        "shared block under SP)",
    reads=Act.SEQUENCE, leaves=Act.REPLICATED, collectives=lambda site: (1 + len(site.args.kwargs), 0))

# Forward: the input's all-gather (none inside another shared block input) and the partial output's
# reduce-scatter (a complete output is cut locally); backward: their mirror (the output gradient
# all-gathered either way).
SEQUENCE_BLOCK = Style(
    name="sequence_block",
    build=lambda site: GatheredSequenceBlock(sequence_dim=site.args.sequence_dim, kwarg=site.args.kwarg),
    args=SequenceBlockArgs,
    doc="a block on the gathered sequence: input all-gathered once, output reduce-scattered (MoE under SP)",
    reads=Act.SEQUENCE, leaves=Act.SEQUENCE, shares_input=True,
    collectives=lambda site: (int(site.plain_input) + int(site.args.partial_output), int(site.plain_input) + 1))

# A column-parallel linear that reads the residual stream itself, with no block around it (BART's
# and Whisper's fc1 sit directly in the layer): its input is all-gathered along the sequence, its
# input gradient reduce-scattered. Its parameters are sharded as colwise shards them.
SEQUENCE_COLWISE = replace(
    COLWISE, name="sequence_colwise", args=SequenceDimArgs,
    build=lambda site: OwnedColwiseParallel(input_layouts=Shard(site.args.sequence_dim)),
    doc="output features sharded; its sequence-sharded input all-gathered first",
    reads=Act.SEQUENCE, layouts=lambda site: None, collectives=lambda site: (1, 1),
    opens_block=lambda args: False)
