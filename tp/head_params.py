"""Parameters that hold one entry per attention head, sharded with the heads.

GPT-OSS gives each attention head a learned sink logit (``self_attn.sinks``, one value per
query head) that its own attention code reads next to the head-sharded queries. Once the
heads are split over the ranks, each rank must hold the sinks of its own heads: the
parameter is sharded on its first dimension, like the query projection's rows, and the
module's forward is lent the local rows.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from .errors import SizeError
from .layout_styles import lend_local_params, local_of, take_back_params


class ShardHeadParams(ParallelStyle):
    """Shard some of a module's own parameters on dimension 0, one block of heads per rank.

    Keyword Args:
        params (tuple[str, ...]): names of the module's own parameters, heads first.

    Example::
        >>> parallelize_module(model, mesh, {"layers.0.self_attn": ShardHeadParams(params=("sinks",))})
    """

    def __init__(self, *, params: tuple[str, ...]):
        super().__init__()
        self.params = tuple(params)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        own = dict(module.named_parameters(recurse=False))
        missing = sorted(set(self.params) - set(own))
        if missing or not self.params:
            raise NotImplementedError(f"head_params: {type(module).__name__} has no parameter {', '.join(missing)}; "
                                      f"its own parameters are {', '.join(own) or 'none'}")
        tp = device_mesh.size()
        for name in self.params:
            param = own[name]
            if param.shape[0] % tp:
                raise SizeError(f"{type(module).__name__}.{name}: {param.shape[0]} heads do not divide by tp={tp}")
            placed = distribute_tensor(param.detach(), device_mesh, [Shard(0)], src_data_rank=None)
            module.register_parameter(name, nn.Parameter(placed, requires_grad=param.requires_grad))

        def lend(mod, args):
            lend_local_params(mod, self.params, lambda name, p: local_of(p))

        def take_back(mod, args, output):
            take_back_params(mod)

        module.register_forward_pre_hook(lend)
        module.register_forward_hook(take_back, always_call=True)
        return module

    def __repr__(self) -> str:
        return f"ShardHeadParams(params={self.params})"
