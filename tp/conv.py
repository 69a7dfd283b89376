"""Tensor-parallel styles for convolutions, which torch does not ship (pytorch/pytorch#133221).

``ConvColwise`` shards a convolution's output channels and ``ConvRowwise`` its input channels;
a ``ConvColwise`` followed (through any per-channel activation) by a ``ConvRowwise`` is the
Megatron MLP pattern for convolutions: one all-reduce in the forward, and one in the backward
for the gradient of the pair's input.

The parameters are DTensors, so state dicts, optimisers and ``full_tensor()`` see the whole
weights. The convolution itself runs on local shards: DTensor's rules for
``aten.convolution`` (torch/distributed/tensor/_ops/_conv_ops.py) only know batch and width
sharding and ignore the weight's placement, so a channel-sharded weight either fails with a
shape error (output channels) or silently gives a wrong result (input channels: the partial
sums are never reduced). A forward pre-hook lends the module's own ``forward`` the local
shards of its parameters for the duration of the call; a forward hook puts the DTensor
parameters back and does the communication. ``forward`` itself is never replaced, so every
``padding_mode`` and ``padding="same"`` keep working.
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
    distribute_module,
    distribute_tensor,
)
from torch.distributed.tensor.parallel import ParallelStyle
from torch.distributed.tensor.placement_types import Placement

from .errors import SizeError

__all__ = ["ChannelSizeError", "ConvColwise", "ConvRowwise"]

_SUPPORTED = (nn.Conv1d, nn.Conv2d)
_LENT = "_tp_conv_lent_params"  # the DTensor parameters while the module runs on local shards


class ChannelSizeError(SizeError, ValueError):
    """A convolution's sharded channel count does not divide by the tensor-parallel size."""


def _channel_dim(module: nn.Module, x: torch.Tensor) -> int:
    """1 for batched input ``[N, C, *spatial]``, 0 for unbatched ``[C, *spatial]``."""
    return x.dim() - len(module.kernel_size) - 1


class _ChannelParallelConv(ParallelStyle):
    """What ConvColwise and ConvRowwise share: checks, parameter placement, lending local shards."""

    _sharded: str  # the module attribute that counts the sharded channels
    _what: str  # the same in words, for error messages
    _weight_placement: Placement
    _bias_placement: Placement

    def __init__(self, *, use_local_output: bool = True):
        super().__init__()
        self.use_local_output = use_local_output

    def _check(self, module: nn.Module, device_mesh: DeviceMesh) -> None:
        name = type(self).__name__
        if not isinstance(module, _SUPPORTED):
            raise NotImplementedError(
                f"{name} supports nn.Conv1d and nn.Conv2d, but the module is a {type(module).__name__}; "
                "choose another style for it or leave it out of the plan"
            )
        if module.groups != 1:
            raise NotImplementedError(
                f"{name} does not support grouped or depthwise convolutions: {module} has "
                f"groups={module.groups}; leave it out of the plan to keep it whole on every rank"
            )
        channels, size = getattr(module, self._sharded), device_mesh.size()
        if channels % size:
            raise ChannelSizeError(
                f"{name}: {module} has {channels} {self._what} ({self._sharded}), which do not divide "
                f"by the tensor-parallel size {size}; use a tensor-parallel size that divides "
                f"{channels}, or leave this convolution out of the plan"
            )

    def _partition(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        placements = {"weight": self._weight_placement, "bias": self._bias_placement}
        for p_name, param in list(module.named_parameters(recurse=False)):
            placed = distribute_tensor(param, device_mesh, [placements[p_name]], src_data_rank=self.src_data_rank)
            module.register_parameter(p_name, nn.Parameter(placed, requires_grad=param.requires_grad))

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self._check(module, device_mesh)
        distribute_module(module, device_mesh, self._partition)
        module.register_forward_pre_hook(partial(self._lend_local, device_mesh), with_kwargs=True)
        # always_call: the DTensor parameters come back even when forward raises
        module.register_forward_hook(partial(self._take_back, device_mesh), always_call=True)
        return module

    def _lend_local(self, device_mesh, module, args, kwargs):
        if args:
            x, rest = args[0], args[1:]
        elif "input" in kwargs:
            x, rest = kwargs.pop("input"), ()
        else:
            raise TypeError(f"{type(self).__name__}: {type(module).__name__} was called without an input")
        x = self._local_input(module, x, device_mesh)
        weight, bias = module._parameters["weight"], module._parameters["bias"]
        module.__dict__[_LENT] = (weight, bias)
        module._parameters["weight"] = weight.to_local()
        module._parameters["bias"] = self._local_bias(bias)
        return (x, *rest), kwargs

    def _take_back(self, device_mesh, module, args, output):
        lent = module.__dict__.pop(_LENT, None)
        if lent is None:  # the pre-hook failed before lending anything
            return None
        module._parameters["weight"], module._parameters["bias"] = lent
        if output is None:  # forward raised; its error propagates
            return None
        return self._finish_output(module, output, lent[1], device_mesh)

    def _local_input(self, module, x, device_mesh) -> torch.Tensor:
        raise NotImplementedError

    def _local_bias(self, bias):
        raise NotImplementedError

    def _finish_output(self, module, output, bias, device_mesh):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(use_local_output={self.use_local_output})"


class ConvColwise(_ChannelParallelConv):
    """Shard an ``nn.Conv1d`` or ``nn.Conv2d`` along its output channels.

    The weight and the bias become ``Shard(0)`` DTensors. The input is replicated: a plain
    tensor (the same on every rank) or a DTensor, which is redistributed to ``Replicate`` if
    it is not already. Each rank convolves the whole input with its own output channels, with
    no communication in the forward. In the backward each rank's input gradient covers only
    its channels; for a plain input the ranks all-reduce it (one all-reduce, as torch's
    ``ColwiseParallel`` does for linears), and for a replicated DTensor input it stays
    ``Partial`` so that whoever replicated the input reduces all its consumers at once.

    Grouped and depthwise convolutions (``groups > 1``) are refused with ``NotImplementedError``,
    as are other modules; an output channel count that does not divide by the mesh size raises
    ``ChannelSizeError`` (a ``ValueError``).

    Keyword Args:
        use_local_output (bool): return this rank's channels as a plain tensor (channel dim 1,
            or 0 for unbatched input) rather than a ``Shard(1)`` DTensor. Default: True.

    Example::
        >>> from torch.distributed.device_mesh import init_device_mesh
        >>> from torch.distributed.tensor.parallel import parallelize_module
        >>> from tp.conv import ConvColwise, ConvRowwise
        >>> mesh = init_device_mesh("cuda", (4,))
        >>> # conv1: C -> 2C channels, conv2: 2C -> C, a GELU between them
        >>> plan = {"blocks.*.conv1": ConvColwise(), "blocks.*.conv2": ConvRowwise()}
        >>> model = parallelize_module(model, mesh, plan)
    """

    _sharded, _what = "out_channels", "output channels"
    _weight_placement = _bias_placement = Shard(0)

    def _local_input(self, module, x, device_mesh) -> torch.Tensor:
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, device_mesh, [Replicate()], run_check=False)
        elif tuple(x.placements) != (Replicate(),):
            x = x.redistribute(device_mesh, [Replicate()])
        # The local input gradient is this rank's share of the whole gradient.
        return x.to_local(grad_placements=[Partial()])

    def _local_bias(self, bias):
        return None if bias is None else bias.to_local()

    def _finish_output(self, module, output, bias, device_mesh):
        if self.use_local_output:
            return output
        return DTensor.from_local(output, device_mesh, [Shard(_channel_dim(module, output))], run_check=False)


class ConvRowwise(_ChannelParallelConv):
    """Shard an ``nn.Conv1d`` or ``nn.Conv2d`` along its input channels.

    The weight becomes a ``Shard(1)`` DTensor and the bias a ``Replicate`` DTensor. The input
    arrives channel-sharded: a plain tensor holding this rank's channels (the local output of
    a ``ConvColwise``), or a DTensor, redistributed to ``Shard`` on the channel dim if it is
    not already. Each rank convolves its channels without the bias, the partial sums are
    all-reduced (the one collective of a ``ConvColwise`` / ``ConvRowwise`` pair), and the bias
    is added once, after the reduction. Every rank's bias gradient is then the whole gradient,
    as its ``Replicate`` placement says.

    Grouped and depthwise convolutions (``groups > 1``) are refused with ``NotImplementedError``,
    as are other modules; an input channel count that does not divide by the mesh size raises
    ``ChannelSizeError`` (a ``ValueError``).

    Keyword Args:
        use_local_output (bool): return the full output as a plain tensor rather than a
            ``Replicate`` DTensor. Default: True.

    Example::
        >>> from torch.distributed.device_mesh import init_device_mesh
        >>> from torch.distributed.tensor.parallel import parallelize_module
        >>> from tp.conv import ConvColwise, ConvRowwise
        >>> mesh = init_device_mesh("cuda", (4,))
        >>> plan = {"blocks.*.conv1": ConvColwise(), "blocks.*.conv2": ConvRowwise()}
        >>> model = parallelize_module(model, mesh, plan)
    """

    _sharded, _what = "in_channels", "input channels"
    _weight_placement, _bias_placement = Shard(1), Replicate()

    def _local_input(self, module, x, device_mesh) -> torch.Tensor:
        cdim, expected = _channel_dim(module, x), module.in_channels // device_mesh.size()
        if isinstance(x, DTensor) and cdim >= 0:
            if tuple(x.placements) != (Shard(cdim),):
                x = x.redistribute(device_mesh, [Shard(cdim)])
            x = x.to_local()
        if cdim < 0 or x.shape[cdim] != expected:
            raise ValueError(
                f"{type(self).__name__}: {module} expects this rank's {expected} of its "
                f"{module.in_channels} input channels (the local output of a ConvColwise), but got "
                f"an input of shape {tuple(x.shape)}"
            )
        return x

    def _local_bias(self, bias):
        return None  # added once after the all-reduce, not on every rank's partial sum

    def _finish_output(self, module, output, bias, device_mesh):
        partial_sum = DTensor.from_local(output, device_mesh, [Partial()], run_check=False)
        output = partial_sum.redistribute(device_mesh, [Replicate()]).to_local()
        if bias is not None:
            shape = [1] * output.dim()
            shape[_channel_dim(module, output)] = -1
            output = output + bias.to_local().view(shape)
        if self.use_local_output:
            return output
        return DTensor.from_local(output, device_mesh, [Replicate()], run_check=False)
