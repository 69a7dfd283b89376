"""Parameters used whole on sharded activations: their gradients summed over the ranks.

A per-head norm's weight (Qwen3's q_norm), a learnable activation scalar (Apertus' xIELU
``alpha_p``) or a mixing scalar (DiffLlama's ``lambda_q1``) is the same on every rank, but
each rank applies it only to its own heads or features, so each rank's gradient is a part
of the whole. Megatron's answer is an identity in the forward whose backward all-reduces;
here the parameter is a replicated DTensor, and the module's own forward is lent that identity's
output on its local tensor in place of the parameter.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ParallelStyle

from ..sharding.collectives import f
from ..sharding.lending import lend_during_forward, lend_local_params, local_of
from ..sharding.tags import replicated_parameter
from .descriptor import Act, Args, Site, Style


class SumGrads(ParallelStyle):
    """Keep a module's parameters whole, and sum their gradients over the tensor-parallel ranks.

    Keyword Args:
        params (tuple[str, ...]): names of the module's own parameters to treat; default: all.

    Example::
        >>> parallelize_module(model, mesh, {"layers.0.mlp.act_fn": SumGrads()})
        >>> parallelize_module(model, mesh, {"layers.0.self_attn": SumGrads(params=("lambda_q1",))})
    """

    def __init__(self, *, params: tuple[str, ...] = ()):
        super().__init__()
        self.params = tuple(params)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        own = [n for n, _ in module.named_parameters(recurse=False)]
        names = self.params or tuple(own)
        missing = sorted(set(names) - set(own))
        if missing:
            raise NotImplementedError(f"sum_grads: {type(module).__name__} has no parameter {', '.join(missing)}; "
                                      f"its own parameters are {', '.join(own) or 'none'}")
        for name in names:
            module.register_parameter(name, replicated_parameter(module._parameters[name], device_mesh))
        group = device_mesh.get_group()
        lend_during_forward(module, lambda: lend_local_params(
            module, names, lambda name, p: f(local_of(p), group)))
        return module

    def __repr__(self) -> str:
        return f"SumGrads(params={self.params})"


class SumGradsArgs(Args):
    params: tuple[str, ...] = ()


def _summed(site: Site) -> tuple[int, int]:
    """One all-reduce per parameter in the backward."""
    return 0, len(site.args.params or list(site.module.parameters(recurse=False)))


# It leaves its activation as it was read: its parameters are used whole on sharded features.
SUM_GRADS = Style(
    name="sum_grads", build=lambda site: SumGrads(params=site.args.params), args=SumGradsArgs, reads=Act.ANY,
    doc="parameters used whole on sharded activations (per-head norms, learnable scalars): gradients summed",
    collectives=_summed)
