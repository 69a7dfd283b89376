"""Tensor-parallel styles for convolutions, which torch does not ship (pytorch/pytorch#133221).

``ConvColwise`` shards a convolution's output channels and ``ConvRowwise`` its input channels;
a ``ConvColwise`` followed (through any per-channel activation) by a ``ConvRowwise`` is the
Megatron MLP pattern for convolutions: one all-reduce in the forward, and one in the backward
for the gradient of the pair's input. They are the column and row styles of
tp/layout_styles.py restricted to ``nn.Conv1d`` / ``nn.Conv2d``; the registry's ``colwise``
and ``rowwise`` pick them for convolutions.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from .errors import SizeError
from .layout_styles import CONVOLUTIONS, ColwiseLayout, RowwiseLayout

__all__ = ["ChannelSizeError", "ConvColwise", "ConvRowwise"]


class ChannelSizeError(SizeError, ValueError):
    """A convolution's sharded channel count does not divide by the tensor-parallel size."""


class _ConvOnly:
    size_error = ChannelSizeError

    def __init__(self, *, use_local_output: bool = True):
        super().__init__(use_local_output=use_local_output)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, CONVOLUTIONS):
            raise NotImplementedError(
                f"{type(self).__name__} supports nn.Conv1d and nn.Conv2d, but the module is a "
                f"{type(module).__name__}; choose another style for it or leave it out of the plan")
        return super()._apply(module, device_mesh)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(use_local_output={self.use_local_output})"


class ConvColwise(_ConvOnly, ColwiseLayout):
    """Shard an ``nn.Conv1d`` or ``nn.Conv2d`` along its output channels.

    The weight and the bias become ``Shard(0)`` DTensors. The input is replicated (a plain
    tensor, the same on every rank, or a DTensor redistributed to ``Replicate``); each rank
    convolves it with its own output channels, with no communication in the forward. The
    input gradient, partial on each rank, is all-reduced for a plain input, and stays
    ``Partial`` for a replicated DTensor input, for whoever replicated it to reduce once.
    Grouped convolutions raise ``NotImplementedError``; channels that do not divide by the
    mesh size raise ``ChannelSizeError``.

    Keyword Args:
        use_local_output (bool): return this rank's channels as a plain tensor rather than a
            ``Shard(1)`` DTensor. Default: True.

    Example::
        >>> mesh = init_device_mesh("cuda", (4,))
        >>> # conv1: C -> 2C channels, conv2: 2C -> C, a GELU between them
        >>> plan = {"blocks.*.conv1": ConvColwise(), "blocks.*.conv2": ConvRowwise()}
        >>> model = parallelize_module(model, mesh, plan)
    """


class ConvRowwise(_ConvOnly, RowwiseLayout):
    """Shard an ``nn.Conv1d`` or ``nn.Conv2d`` along its input channels.

    The weight becomes a ``Shard(1)`` DTensor and the bias a ``Replicate`` DTensor. The input
    holds this rank's channels (the local output of a ``ConvColwise``, or a DTensor sharded on
    the channels). Each rank convolves its channels without the bias, the partial sums are
    all-reduced, and the bias is added once, after the reduction.

    Keyword Args:
        use_local_output (bool): return the full output as a plain tensor rather than a
            ``Replicate`` DTensor. Default: True.

    Example::
        >>> plan = {"blocks.*.conv1": ConvColwise(), "blocks.*.conv2": ConvRowwise()}
        >>> model = parallelize_module(model, mesh, plan)
    """
