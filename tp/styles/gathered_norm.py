"""A norm over every feature of a column-sharded tensor, run whole on gathered features.

OLMo 2 normalises the query over all heads at once (``q_norm`` of ``num_heads * head_dim``
features) and BitNet normalises the attention output and the MLP's intermediate features
before their row-parallel projections. Each rank holds only its own features there, and a
norm over a slice would use the slice's statistics, not the whole tensor's. Here the features
are all-gathered, the module's own forward runs on the whole tensor, and each rank keeps its
own features of the result. The norm's weight stays whole; each rank's gradient covers only
its features, so the gradients are summed over the ranks, and so are the gathered input's.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from ..sharding.collectives import f
from ..sharding.lending import lend_local_params, local_of, take_back_params
from ..sharding.tags import replicated_parameter
from .descriptor import Act, PlainStyle, Style


class GatheredNorm(PlainStyle):
    """Run a norm on the all-gathered last dimension of its column-sharded input; keep this
    rank's equal slice of its output.

    The input must be sharded evenly and in rank order along its last dimension (the output of
    a plain column-parallel linear, or the input of a plain row-parallel one); so must every other
    positional tensor argument of the same width (a gated norm's gate), which is gathered too. One
    all-gather per gathered tensor in the forward; a reduce-scatter of each one's gradient and an
    all-reduce per parameter in the backward.

    Example::
        >>> parallelize_module(model, mesh, {"layers.0.self_attn.q_norm": GatheredNorm()})
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        names = [n for n, _ in module.named_parameters(recurse=False)]
        for name in names:
            module.register_parameter(name, replicated_parameter(module._parameters[name], device_mesh))
        group, tp, rank = device_mesh.get_group(), device_mesh.size(), device_mesh.get_local_rank()

        def gather_one(x):
            whole = DTensor.from_local(x, device_mesh, [Shard(x.dim() - 1)], run_check=False)
            # each rank's gradient of the whole tensor covers only its own output features: partial
            return whole.redistribute(device_mesh, [Replicate()]).to_local(grad_placements=[Partial()])

        def gather(mod, args):
            width = args[0].shape[-1]
            lend_local_params(mod, names, lambda name, p: f(local_of(p), group))
            # a gated norm's gate (Mamba-2's) is sharded like its input
            return tuple(gather_one(a) if isinstance(a, torch.Tensor) and a.shape[-1] == width else a for a in args)

        def keep_own(mod, args, output):
            take_back_params(mod)
            if not isinstance(output, torch.Tensor):
                return output
            width = output.shape[-1] // tp
            return output.narrow(-1, rank * width, width)

        module.register_forward_pre_hook(gather)
        module.register_forward_hook(keep_own, always_call=True)
        return module


# An all-gather; in the backward a reduce-scatter and an all-reduce per parameter.
GATHERED_NORM = Style(
    name="gathered_norm", build=lambda site: GatheredNorm(),
    doc="a norm over all features of a column-sharded tensor (OLMo 2's q_norm): gathered, run whole",
    reads=Act.FEATURES, leaves=Act.FEATURES,
    collectives=lambda site: (1, 1 + len(list(site.module.parameters(recurse=False)))))
