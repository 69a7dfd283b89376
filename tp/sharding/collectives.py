"""The autograd functions the styles share: Megatron's ``f`` and ``g``, and the way out of DTensor.

``f`` is the identity in the forward and an all-reduce of the gradient in the backward: it
marks where a tensor that every rank holds whole starts to be used on sharded data (a
column-parallel linear's input, a per-head norm's weight, rows replicated over ranks). ``g`` is
its mirror: an all-reduce of partial sums in the forward (a row-parallel linear's output), the
identity in the backward.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate
from torch.distributed.tensor._utils import compute_global_tensor_info


class _ReduceGradInBackward(torch.autograd.Function):
    """Identity in the forward; ``reduce(grad)`` sums the gradient in place in the backward.

    Part of the graph rather than a hook on a Parameter: FSDP2 replaces the Parameters, and a
    post-accumulate hook would sum earlier micro-batches again under gradient accumulation.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, reduce: Callable[[torch.Tensor], None]):
        ctx.reduce = reduce
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        ctx.reduce(grad)
        return grad, None


def f(x: torch.Tensor, group) -> torch.Tensor:
    """Megatron's ``f``: ``x`` unchanged; its gradient all-reduced over ``group`` in the backward."""
    return _ReduceGradInBackward.apply(x, partial(dist.all_reduce, group=group))


class _ReduceGradsTogether(torch.autograd.Function):
    """Identity on several tensors; in the backward their gradients are summed by one all-reduce."""

    @staticmethod
    def forward(ctx, group, *xs: torch.Tensor):
        ctx.group = group
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        dist.all_reduce(flat, group=ctx.group)
        return None, *(piece.view_as(grad) for piece, grad in zip(flat.split([g.numel() for g in grads]), grads))


def mesh_group(mesh):
    """The process group of a 1-D ``mesh`` the collectives run on; None on one rank, where there is nothing to sum."""
    return mesh.get_group() if mesh.size() > 1 else None


def replicated_input(x: torch.Tensor, group) -> torch.Tensor:
    """The local tensor a column-parallel module computes with, from its replicated input ``x``.

    A DTensor (a block input shared by several linears, ``block_input``) is read locally with its
    gradient marked partial, so that the DTensor sums the gradients of all its readers at once; a
    plain tensor that needs a gradient gets ``f``; one that needs none (decoding under ``no_grad``)
    is used as it is. ``group`` is None on one rank, where there is nothing to sum.
    """
    if isinstance(x, DTensor):
        if tuple(x.placements) != (Replicate(),):
            x = x.redistribute(x.device_mesh, [Replicate()])
        return x.to_local(grad_placements=[Partial()])
    return f(x, group) if x.requires_grad and group is not None else x


def f_together(xs: list[torch.Tensor], group) -> list[torch.Tensor]:
    """``f`` on several tensors at once: their gradients summed by one all-reduce, not one each."""
    return list(_ReduceGradsTogether.apply(group, *xs))


class _AllReduceInForward(torch.autograd.Function):
    """``x`` summed over ``group`` in the forward; the gradient passed on unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group):
        total = x.contiguous().clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def g(x: torch.Tensor, group) -> torch.Tensor:
    """Megatron's ``g``: the partial sums ``x`` of every rank all-reduced over ``group``; in the
    backward the gradient, the same on every rank, passes unchanged."""
    return _AllReduceInForward.apply(x, group)


def rows_of_whole(whole: torch.Tensor, layout, dim: int, mesh) -> torch.Tensor:
    """This rank's rows of ``whole``, the local tensor of a parameter kept whole because its
    ``layout`` (a ``tp.sharding.layouts.Layout`` along ``dim``) gives some rows to several ranks of
    ``mesh`` (kv heads with TP > kv heads). Each rank's gradient of ``whole`` covers only the rows
    it used, so in the backward it is summed over the ranks (``f``, one all-reduce)."""
    rows = torch.tensor(layout.rows(mesh.size(), mesh.get_local_rank()), dtype=torch.long, device=whole.device)
    if whole.requires_grad:
        whole = f(whole, mesh.get_group())
    return whole.index_select(dim, rows)


class _OwnedLocal(torch.autograd.Function):
    """A DTensor's local tensor as a tensor of its own (an alias, not a view), so that the model may
    change it in place: ``DTensor.to_local()`` returns a view made inside an autograd Function,
    which autograd forbids modifying in place (OLMo's ``clamp_`` of q/k/v, Falcon's
    ``mlp_output += attention_output``). No copy is made. In the backward the gradient becomes a
    DTensor with the same placements, as with ``to_local()``."""

    @staticmethod
    def forward(ctx, x: DTensor):
        ctx.spec = x._spec
        return x._local_tensor.detach()

    @staticmethod
    def backward(ctx, grad):
        spec = ctx.spec
        # the gradient's own strides (T5's is not contiguous), as DTensor's to_local computes them
        _, stride = compute_global_tensor_info(grad, spec.mesh, spec.placements)
        return DTensor.from_local(grad, spec.mesh, spec.placements, shape=spec.shape, stride=tuple(stride),
                                  run_check=False)


def to_local(x: torch.Tensor) -> torch.Tensor:
    """``x``'s local tensor, which the model may modify in place; a plain tensor is returned as is."""
    return _OwnedLocal.apply(x) if isinstance(x, DTensor) else x


class _GatherLastDim(torch.autograd.Function):
    """Every rank's slice of the last dimension all-gathered into the whole (``size`` wide); in the
    backward each rank keeps the gradient of its own slice, no collective."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, size: int, group):
        ranks, rank = dist.get_world_size(group), dist.get_rank(group)
        # DTensor's Shard splits as torch.chunk does: every rank `chunk` wide, the last ones narrower
        # or empty. Padded to `chunk`, the slices laid end to end hold the whole in its first `size`.
        chunk = -(-size // ranks)
        ctx.start, ctx.width = min(rank * chunk, size), x.shape[-1]
        padded = x.contiguous() if ctx.width == chunk else torch.nn.functional.pad(x, (0, chunk - ctx.width)).contiguous()
        slices = [torch.empty_like(padded) for _ in range(ranks)]
        dist.all_gather(slices, padded, group=group)
        whole = torch.cat(slices, dim=-1)
        # a narrowed view would be a view made inside an autograd Function, which the model could
        # not change in place; a vocabulary that divides needs no narrowing and no copy
        return whole if whole.shape[-1] == size else whole[..., :size].contiguous()

    @staticmethod
    def backward(ctx, grad):
        return grad[..., ctx.start:ctx.start + ctx.width].contiguous(), None, None


def gather_last_dim(x: torch.Tensor, size: int, group) -> torch.Tensor:
    """The whole of a tensor whose last dimension (``size`` in all) is split over ``group`` as
    DTensor's ``Shard(-1)`` splits it, ``x`` being this rank's slice: a column-parallel lm_head's
    logits gathered along the vocabulary (one all-gather). The gradient of the whole, the same on
    every rank, is sliced back in the backward."""
    return _GatherLastDim.apply(x, size, group)
