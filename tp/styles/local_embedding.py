"""The vocab-parallel embedding on plain local tensors.

Its weight is a ``Shard(0)`` DTensor, as with torch's ``RowwiseParallel`` on an ``nn.Embedding``
(a vocabulary that does not divide is split as DTensor splits it: 32001 rows over 2 ranks are
16001 + 16000), so checkpoints, optimizers, clipping, FSDP2 and a tied lm_head see the same
parameter. But each forward is lent the local rows and looks up plain token ids: ids outside this
rank's rows are looked up as row 0 and their vectors zeroed, and the partial vectors of all ranks
are summed by Megatron's ``g``, the one collective. No DTensor operator runs per call, which is
what decoding a token at a time pays for most.

Under sequence parallelism the style stays torch's, whose output is a sequence-sharded DTensor.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.parallel import ParallelStyle

from ..sharding.collectives import g
from ..sharding.lending import lend_local_params, local_of, take_back_params
from .layout import first_input
from .local_linear import shard_vocab_rows

_OUTSIDE = "_tp_ids_outside"  # on the module during a call: where the ids fall outside this rank's rows


def is_plain_embedding(module: nn.Module) -> bool:
    """An ``nn.Embedding`` whose forward is a lookup and nothing else, with no option that reads or
    changes rows an id does not name: ``max_norm`` renormalises the rows looked up (the masked ids'
    row 0 too), ``scale_grad_by_freq`` counts them, ``sparse`` gradients are not DTensors."""
    return (isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward
            and module.max_norm is None and not module.scale_grad_by_freq and not module.sparse)


def _local_rows(rows: int, name: str, weight: torch.Tensor) -> torch.Tensor:
    """This rank's rows to look up in. A vocabulary smaller than about TP^2 can leave a rank none
    (9 rows over 4 ranks: 3, 3, 3, 0): it looks up a zero row that autograd ties to the empty shard,
    so its gradient is an empty shard as on every rank."""
    local = local_of(weight)
    return local if rows else torch.nn.functional.pad(local, (0, 0, 0, 1))


class LocalEmbedding(ParallelStyle):
    """A vocab-parallel ``nn.Embedding`` on local tensors: vocabulary rows sharded, each rank's
    looked-up vectors all-reduced (``g``). Takes a plain ``nn.Embedding`` (``is_plain_embedding``).

    Example::
        >>> parallelize_module(model, mesh, {"model.embed_tokens": LocalEmbedding()})
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        (rows, _), (start, _) = compute_local_shape_and_global_offset(module.weight.shape, device_mesh, [Shard(0)])
        shard_vocab_rows(module, "weight", device_mesh)
        # padding_idx keeps its row's gradient at zero: in the local lookup it is a local row, or none
        padding = module.padding_idx
        local_padding = padding - start if padding is not None and start <= padding < start + rows else None
        group = device_mesh.get_group() if device_mesh.size() > 1 else None
        module.register_forward_pre_hook(partial(self._lend, start, rows, local_padding), with_kwargs=True)
        module.register_forward_hook(partial(self._reduce, group, padding), always_call=True)
        return module

    @staticmethod
    def _lend(start, rows, local_padding, module, args, kwargs):
        ids, rebuild = first_input("LocalEmbedding", module, args, kwargs)
        ids = ids.to_local() if isinstance(ids, DTensor) else ids
        outside = (ids < start) | (ids >= start + rows)
        module.__dict__[_OUTSIDE] = outside
        module.padding_idx = local_padding
        lend_local_params(module, ("weight",), partial(_local_rows, rows))
        return rebuild((ids - start).masked_fill_(outside, 0))

    @staticmethod
    def _reduce(group, padding, module, args, output):
        take_back_params(module)
        module.padding_idx = padding
        outside = module.__dict__.pop(_OUTSIDE, None)
        if output is None or outside is None:  # forward raised: its error propagates
            return None
        output = output.masked_fill(outside.unsqueeze(-1), 0.0)
        return g(output, group) if group is not None else output

    def __repr__(self) -> str:
        return "LocalEmbedding()"
