"""``head_norm``: a norm per attention head inside the region where heads are sharded."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import (
    DTensor,
    Replicate,
    Shard,
    distribute_module,
    distribute_tensor,
)
from torch.distributed.tensor.parallel import ParallelStyle

from ..sharding.collectives import to_local
from .descriptor import Act, Args, Site, Style


class HeadNorm(ParallelStyle):
    """A norm over each attention head's features, inside the region where heads are sharded.

    Qwen3 normalises q and k per head with one weight of ``head_dim`` features shared by all
    heads. A rank sees only its own heads, so a plain weight would get a silently incomplete
    gradient. Here the input is marked as sharded along the heads dimension; a shared weight
    becomes a replicated DTensor whose gradient DTensor sums over ranks, and a per-head weight
    (heads first) is sharded evenly with the heads. (Cohere's per-head weights are ``shard_rows``,
    which also follows a balanced head split.) The output goes back to a local tensor for the
    attention code that follows.

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
            return to_local(output)

        return distribute_module(module, device_mesh, self._partition, input_fn, output_fn)

    def __repr__(self) -> str:
        return f"HeadNorm(head_dim={self.head_dim})"


class HeadNormArgs(Args):
    head_dim: int = 2


def _per_head_weights(site: Site) -> dict[str, int]:
    """A weight with a row per head is sharded with the heads; a shared one stays whole."""
    return {n: 0 for n, p in site.module.named_parameters(recurse=False) if p.dim() >= 2}


HEAD_NORM = Style(
    name="head_norm", build=lambda site: HeadNorm(head_dim=site.args.head_dim), args=HeadNormArgs,
    doc="a norm applied per attention head inside the head-sharded region (q_norm / k_norm)",
    reads=Act.FEATURES, leaves=Act.FEATURES, sharded_dims=_per_head_weights,
    # each rank normalises its own heads with the shared weight; a per-head weight is a per-head
    # value, which tp.checks.sizes asks to divide
    reads_balanced_heads=True)
