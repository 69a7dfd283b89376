"""What the Mamba and Mamba-2 mixer styles share: the size check, the two projections at the
mixer's ends, and the whole sequence their convolution and scan need under sequence parallelism.

Both mixers project their input once (``in_proj``, column-parallel in a layout the mixer knows)
and map the rank's channels back at the end (``out_proj``, row-parallel). Under sequence
parallelism the mixer all-gathers its sequence-sharded input once, into a plain tensor (a padding
mask multiplies it before ``in_proj``) whose gradient, partial on each rank, is reduce-scattered in
the backward; ``in_proj`` reads it as it is, and ``out_proj`` reduce-scatters its partial output
along the sequence instead of all-reducing it.
"""

from __future__ import annotations

from functools import partial

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module

from ..errors import PlanError, SizeError
from ..sharding.collectives import mesh_group, replicated_input
from ..sharding.layouts import Layout
from .descriptor import Act
from .layout import GivenColwiseLayout, first_input
from .linear import OwnedRowwiseParallel, SequenceArgs


def _gather_input(style: str, mesh: DeviceMesh, module: nn.Module, args: tuple, kwargs: dict):
    """The mixer's forward pre-hook under sequence parallelism: its sequence-sharded input (a
    DTensor) all-gathered into a plain tensor whose gradient is reduce-scattered (``replicated_input``)."""
    x, rebuild = first_input(style, module, args, kwargs)
    if not isinstance(x, DTensor):
        raise PlanError(f"{style}: under sequence parallelism {type(module).__name__} expects the "
                        "sequence-sharded residual stream (a DTensor), but got a plain tensor")
    return rebuild(replicated_input(x, mesh_group(mesh)))


class MixerParallel(ParallelStyle):
    """Base of the mixer styles: ``_shard_ends`` checks the sizes and shards in_proj and out_proj
    (with the sequence gathered first under sequence parallelism); a subclass shards the rest.

    Keyword Args:
        sequence_dim (int, optional): under sequence parallelism, the sequence dimension of the
            mixer's input and output: the input is all-gathered along it and ``out_proj``'s
            output reduce-scattered. Default: None (no sequence parallelism).
    """

    name: str  # the style's name, for errors
    sizes: str  # the sizes that must divide, for errors

    def __init__(self, *, sequence_dim: int | None = None):
        super().__init__()
        self.sequence_dim = sequence_dim

    def _shard_ends(self, module: nn.Module, device_mesh: DeviceMesh, layouts: dict[str, tuple[Layout, int]]) -> None:
        problems = [p for layout, _ in layouts.values() for p in layout.problems(device_mesh.size())]
        if problems:
            raise SizeError(f"{type(module).__name__}: {'; '.join(dict.fromkeys(problems))}; use a tensor-parallel "
                            f"size that divides {self.sizes}")
        gathered = self.sequence_dim is not None
        if gathered:
            module.register_forward_pre_hook(partial(_gather_input, self.name, device_mesh), with_kwargs=True)
            out_proj = OwnedRowwiseParallel(output_layouts=Shard(self.sequence_dim), use_local_output=False)
        else:
            out_proj = OwnedRowwiseParallel()
        parallelize_module(module.in_proj, device_mesh,
                           GivenColwiseLayout(layouts["in_proj.weight"][0], gathered_input=gathered))
        parallelize_module(module.out_proj, device_mesh, out_proj)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sequence_dim={self.sequence_dim})"


def stream(args: SequenceArgs) -> Act:
    """The layout of a mixer's input and output: sequence shards under sequence parallelism."""
    return Act.SEQUENCE if args.sequence_dim is not None else Act.REPLICATED
