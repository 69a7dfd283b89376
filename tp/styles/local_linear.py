"""Column- and row-parallel linears that compute on plain local tensors.

Their weights are ``Shard`` DTensors, as with torch's ``ColwiseParallel`` / ``RowwiseParallel``,
so optimizers, clipping and checkpoints see the same parameters. But each forward is lent the
local shards (``tp.sharding.lending``) and runs ``F.linear`` on plain tensors, with Megatron's
``f`` on a column-parallel input and ``g`` on a row-parallel output as the only collectives: no
DTensor dispatch per call, no copy of the output, which the model may change in place (OLMo
clamps q, k and v; Falcon adds to its MLP output). Decoding runs a handful of tokens per call, so
this per-call cost is what it pays most.

The lm_head is a local column-parallel linear too, its logits all-gathered along the vocabulary.

Under sequence parallelism and with vocab-parallel logits the styles stay torch's: the residual
stream between blocks is a sequence-sharded DTensor there, whose global shape the model reads.
"""

from __future__ import annotations

from functools import partial

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from ..sharding.collectives import g, gather_last_dim, mesh_group, replicated_input
from ..sharding.heads import Heads
from ..sharding.layouts import Layout, Part
from ..sharding.lending import lend_local_params, local_of, take_back_params
from ..sharding.tags import local_rows, place_parameter, replicated_parameter
from .layout import first_input, heads_layout


def _heads_layouts(module: nn.Module, names: tuple[str, ...], dim: int, heads: Heads | None):
    """Parameter name -> (layout, dim) where the features are heads; None otherwise."""
    found = {name: (layout, dim) for name in names if getattr(module, name, None) is not None
             and (layout := heads_layout(getattr(module, name).shape[dim], heads)) is not None}
    return found or None


def _local_shard(name: str, param):
    return local_of(param)


def _place(module: nn.Module, names: tuple[str, ...], dim: int, heads_layouts: dict | None, mesh: DeviceMesh):
    """Place the parameters ``names`` by their heads layouts, else as single rows; the function that
    lends the forward a parameter's local tensor: its rows of a whole-stored one (heads split
    balanced), else the local shard, with no lookup on the hot path."""
    heads_layouts = heads_layouts or {}
    for name in names:
        param = getattr(module, name, None)
        if param is not None:
            layout, _ = heads_layouts.get(name, (Layout((Part(param.shape[dim], 1),)), dim))
            place_parameter(module, name, layout, dim, mesh)
    if any(layout.repeats_rows(mesh.size()) for layout, _ in heads_layouts.values()):
        return partial(local_rows, module)
    return _local_shard


def shard_vocab_rows(module: nn.Module, name: str, mesh: DeviceMesh) -> None:
    """Replace ``module.name`` by a ``Shard(0)`` DTensor, as torch's styles place a vocab-parallel
    weight (uneven where the vocabulary does not divide), so that an embedding and an lm_head
    sharing it are placed alike and stay tied."""
    param = getattr(module, name)
    module.register_parameter(name, nn.Parameter(distribute_tensor(param.detach(), mesh, [Shard(0)], src_data_rank=None),
                                                 requires_grad=param.requires_grad))


class LocalColwise(ParallelStyle):
    """A column-parallel ``nn.Linear`` on local tensors: output features sharded.

    Its input is replicated: a plain tensor gets ``f`` (its gradient all-reduced in the backward);
    a replicated DTensor (a shared block input, ``block_input``) is read locally with its gradient
    marked partial, so that the block input sums the gradients of all its linears once.

    Keyword Args:
        heads (Heads): the attention's heads, when its output features may be all of them (q_proj):
            they are then split as whole heads, balanced where they do not divide (``heads_layout``).

    Example::
        >>> parallelize_module(model, mesh, {"layers.0.mlp.up_proj": LocalColwise()})
    """

    def __init__(self, *, heads: Heads | None = None):
        super().__init__()
        self.heads = heads

    def layouts(self, module: nn.Module) -> dict[str, tuple[Layout, int]] | None:
        """Parameter name -> (layout, dimension) where its features are heads (``heads_layout``)."""
        return _heads_layouts(module, ("weight", "bias"), 0, self.heads)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        local = _place(module, ("weight", "bias"), 0, self.layouts(module), device_mesh)
        module.register_forward_pre_hook(partial(self._lend, mesh_group(device_mesh), local), with_kwargs=True)
        module.register_forward_hook(lambda mod, args, out: take_back_params(mod) and None, always_call=True)
        return module

    @staticmethod
    def _lend(group, local, module, args, kwargs):
        x, rebuild = first_input("LocalColwise", module, args, kwargs)
        x = replicated_input(x, group)
        lend_local_params(module, ("weight", "bias"), local)
        return rebuild(x)

    def __repr__(self) -> str:
        return "LocalColwise()"


class LocalRowwise(ParallelStyle):
    """A row-parallel ``nn.Linear`` on local tensors: input features sharded, partial outputs
    all-reduced (``g``) and the bias (a replicated DTensor) added once after.

    Keyword Args:
        heads (Heads): the attention's heads, when its input features may be all of them (o_proj);
            see ``LocalColwise``.

    Example::
        >>> parallelize_module(model, mesh, {"layers.0.mlp.down_proj": LocalRowwise()})
    """

    def __init__(self, *, heads: Heads | None = None):
        super().__init__()
        self.heads = heads

    def layouts(self, module: nn.Module) -> dict[str, tuple[Layout, int]] | None:
        """Parameter name -> (layout, dimension) where its features are heads (``heads_layout``)."""
        return _heads_layouts(module, ("weight",), 1, self.heads)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        local = _place(module, ("weight",), 1, self.layouts(module), device_mesh)
        if module.bias is not None:
            module.register_parameter("bias", replicated_parameter(module.bias, device_mesh))
        module.register_forward_pre_hook(partial(self._lend, local), with_kwargs=True)
        module.register_forward_hook(partial(self._reduce, mesh_group(device_mesh)), always_call=True)
        return module

    @staticmethod
    def _lend(local, module, args, kwargs):
        x, rebuild = first_input("LocalRowwise", module, args, kwargs)
        if isinstance(x, DTensor):
            if tuple(x.placements) != (Shard(x.dim() - 1),):
                x = x.redistribute(x.device_mesh, [Shard(x.dim() - 1)])
            x = x.to_local()
        # the bias is added once, after the sum: F.linear runs without it
        lend_local_params(module, ("weight", "bias"), lambda name, param: local(name, param) if name == "weight" else None)
        return rebuild(x)

    @staticmethod
    def _reduce(group, module, args, output):
        lent = take_back_params(module)
        if lent is None or output is None:  # forward raised: its error propagates
            return None
        total = g(output, group) if group is not None else output
        return total + local_of(lent["bias"]) if "bias" in lent else total

    def __repr__(self) -> str:
        return "LocalRowwise()"


class LocalLmHead(ParallelStyle):
    """The lm_head as a local column-parallel ``nn.Linear`` (``LocalColwise``'s input handling):
    vocabulary rows sharded, the logits all-gathered along the vocabulary (``gather_last_dim``), so
    the model returns ordinary full logits. A vocabulary that does not divide is split as DTensor
    splits it (32001 over 2 ranks: 16001 + 16000).

    Example::
        >>> parallelize_module(model, mesh, {"lm_head": LocalLmHead()})
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for name in ("weight", "bias"):
            if getattr(module, name, None) is not None:
                shard_vocab_rows(module, name, device_mesh)
        group = mesh_group(device_mesh)
        module.register_forward_pre_hook(partial(LocalColwise._lend, group, _local_shard), with_kwargs=True)
        module.register_forward_hook(partial(self._gather, group, module.out_features), always_call=True)
        return module

    @staticmethod
    def _gather(group, vocab, module, args, output):
        lent = take_back_params(module)
        if lent is None or output is None:  # forward raised: its error propagates
            return None
        return gather_last_dim(output, vocab, group) if group is not None else output

    def __repr__(self) -> str:
        return "LocalLmHead()"
