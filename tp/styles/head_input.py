"""A ParallelStyle that hands a head-sharded attention only its own heads of a per-head input."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ParallelStyle

from ..errors import PlanError
from ..sharding.layouts import balanced_block
from .descriptor import Act, Args, Style


class SliceHeadInput(ParallelStyle):
    """Slice a per-head tensor that an attention module receives down to this rank's heads.

    ALiBi models build one bias per attention head outside the attention (Bloom's ``alibi``,
    MPT's ``position_bias``) and pass the whole tensor to every layer. Once the attention's
    projections are sharded by heads, rank ``r`` of ``T`` computes heads
    ``[r * H / T, (r + 1) * H / T)`` (balanced where ``T`` does not divide ``H``: 6 heads over 4
    ranks as 2, 2, 1, 1) and must add only their biases. A forward pre-hook on the
    attention module narrows the tensor to those heads; nothing is communicated.

    The heads dimension holds either the ``H`` heads, or ``B * H`` entries of batch-major
    (batch, head) pairs, as Bloom folds them: it is viewed as ``[size / H, H]``, the heads
    are narrowed, and it is folded back. A tensor that is ``None`` is passed on unchanged.
    The tensor must not require a gradient (ALiBi biases are constants): its gradient would
    hold only this rank's heads.

    Keyword Args:
        kwarg (str): the keyword argument that carries the tensor.
        index (int, optional): its position when it is passed positionally instead.
        head_dim (int): the dimension that holds the heads. Default: 0.
        heads (int, optional): the number of heads ``H`` over all ranks; default: the size
            of ``head_dim`` (then batch-folded heads cannot be told apart).

    Example::
        >>> # Bloom: alibi is [batch * heads, 1, kv_length], passed as alibi=...
        >>> parallelize_module(model, mesh, {
        ...     "transformer.h.0.self_attention": SliceHeadInput(kwarg="alibi", index=2, heads=16),
        ...     "transformer.h.0.self_attention.query_key_value": ColwiseLayout(unit="head", heads=heads),
        ...     "transformer.h.0.self_attention.dense": RowwiseParallel()})
        >>> # MPT: position_bias is [heads, 1, max_seq_len]
        >>> SliceHeadInput(kwarg="position_bias", index=1)
    """

    def __init__(self, *, kwarg: str, index: int | None = None, head_dim: int = 0, heads: int | None = None):
        super().__init__()
        self.kwarg, self.index, self.head_dim, self.heads = kwarg, index, head_dim, heads

    def _slice(self, x: torch.Tensor, tp: int, rank: int, where: str) -> torch.Tensor:
        dim = self.head_dim % x.dim()
        size = x.shape[dim]
        heads = self.heads or size
        if size % heads or heads < tp:
            raise PlanError(f"{where}: {self.kwarg} has {size} entries along dimension {dim}, which must hold "
                            f"{heads} heads (or batch x {heads}) split over tp={tp} ranks")
        if x.requires_grad:
            raise PlanError(f"{where}: {self.kwarg} requires a gradient; head_input slices constant per-head "
                            "tensors only, and this one's gradient would hold just this rank's heads")
        local = balanced_block(heads, tp, rank)  # the heads the projections gave this rank
        grouped = x.unflatten(dim, (size // heads, heads))
        return grouped.narrow(dim + 1, local.start, len(local)).flatten(dim, dim + 1)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        tp, rank = device_mesh.size(), device_mesh.get_local_rank()

        def hook(mod, args, kwargs):
            where = type(mod).__name__
            if self.kwarg in kwargs:
                x = kwargs[self.kwarg]
                if isinstance(x, torch.Tensor):
                    kwargs = {**kwargs, self.kwarg: self._slice(x, tp, rank, where)}
                return args, kwargs
            if self.index is not None and len(args) > self.index:
                x = args[self.index]
                if isinstance(x, torch.Tensor):
                    args = (*args[:self.index], self._slice(x, tp, rank, where), *args[self.index + 1:])
                return args, kwargs
            raise PlanError(f"head_input on {where}: it was called without keyword {self.kwarg!r}"
                            + (f" or a positional argument {self.index}" if self.index is not None else "")
                            + "; set the style's kwarg/index to how the model passes the per-head tensor")

        module.register_forward_pre_hook(hook, with_kwargs=True)
        return module

    def __repr__(self) -> str:
        return (f"SliceHeadInput(kwarg={self.kwarg!r}, index={self.index!r}, head_dim={self.head_dim}, "
                f"heads={self.heads!r})")


class HeadInputArgs(Args):
    kwarg: str
    index: int | None = None
    head_dim: int = 0


HEAD_INPUT = Style(
    name="head_input", args=HeadInputArgs, reads=Act.ANY,
    build=lambda site: SliceHeadInput(kwarg=site.args.kwarg, index=site.args.index, head_dim=site.args.head_dim,
                                      heads=site.heads.q if site.heads else None),
    doc="slice a per-head tensor argument of an attention (ALiBi bias) to this rank's query heads")
