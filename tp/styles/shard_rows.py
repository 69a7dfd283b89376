"""Parameters with one row per attention head or per channel, sharded with them.

GPT-OSS gives each attention head a learned sink logit (``self_attn.sinks``) that its attention
code reads next to the head-sharded queries; Mamba keeps per-channel parameters (``A_log``,
``D``, the depthwise ``conv1d``, ``dt_proj``) that its mixer reads directly, next to the
channel-sharded activations, without calling those modules. Once heads or channels are split
over the ranks, each rank must hold the rows of its own: the parameters are sharded on their
first dimension, in rank order like a column-parallel linear's rows, and the module's forward
is lent the local rows (and those of the children it reads directly). One row per query head
follows the heads where they split balanced (6 sinks over 4 ranks: 2, 2, 1, 1), stored whole like
the projections then.
"""

from __future__ import annotations

from functools import partial

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from ..errors import SizeError
from ..sharding.heads import Heads
from ..sharding.lending import lend_during_forward, lend_local_params
from ..sharding.tags import local_rows, place_parameter
from .descriptor import Act, Args, LayoutMap, Site, Style, stored_whole
from .layout import heads_layout


class ShardRows(ParallelStyle):
    """Shard a module's own parameters on dimension 0, one equal block of rows per rank.

    Keyword Args:
        params (tuple[str, ...]): names of the module's own parameters to shard; default: all.
        lend (tuple[str, ...]): children whose sharded parameters this module's forward reads
            directly (Mamba's mixer reads ``conv1d.weight``); their local rows are lent too.
        heads (Heads): the attention's heads, when a parameter may hold one row per query head
            (GPT-OSS's sinks): those rows then follow the heads' split (``heads_layout``).

    Example::
        >>> parallelize_module(model, mesh, {"layers.0.self_attn": ShardRows(params=("sinks",))})
        >>> parallelize_module(model, mesh, {"layers.0.mixer": ShardRows(lend=("conv1d", "dt_proj")),
        ...                                  "layers.0.mixer.conv1d": ShardRows()})
    """

    def __init__(self, *, params: tuple[str, ...] = (), lend: tuple[str, ...] = (), heads: Heads | None = None):
        super().__init__()
        self.params, self.lend, self.heads = tuple(params), tuple(lend), heads

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        own = dict(module.named_parameters(recurse=False))
        names = self.params or tuple(own)
        missing = sorted(set(names) - set(own)) + [c for c in self.lend if not hasattr(module, c)]
        if missing or not (names or self.lend):
            raise NotImplementedError(f"shard_rows: {type(module).__name__} has no parameter or child "
                                      f"{', '.join(missing) or '(none named)'}; its own parameters are "
                                      f"{', '.join(own) or 'none'}")
        tp = device_mesh.size()
        for name in names:
            param = own[name]
            layout = heads_layout(param.shape[0], self.heads)
            if layout is not None and not layout.problems(tp):
                place_parameter(module, name, layout, 0, device_mesh)
                continue
            if param.shape[0] % tp:
                raise SizeError(f"{type(module).__name__}.{name}: {param.shape[0]} rows do not divide by tp={tp}")
            placed = distribute_tensor(param.detach(), device_mesh, [Shard(0)], src_data_rank=None)
            module.register_parameter(name, nn.Parameter(placed, requires_grad=param.requires_grad))
        children = [module.get_submodule(c) for c in self.lend]

        def lend():
            for holder in (module, *children):
                sharded = [n for n, p in holder.named_parameters(recurse=False) if isinstance(p, DTensor)]
                lend_local_params(holder, sharded, partial(local_rows, holder))

        lend_during_forward(module, lend, children)
        return module

    def __repr__(self) -> str:
        return f"ShardRows(params={self.params}, lend={self.lend}, heads={self.heads})"


class ShardRowsArgs(Args):
    params: tuple[str, ...] = ()
    lend: tuple[str, ...] = ()


def _names(site: Site) -> tuple[str, ...]:
    return site.args.params or tuple(dict(site.module.named_parameters(recurse=False)))


def _per_head(site: Site) -> LayoutMap:
    """The parameters with one row per query head, laid out as the heads split."""
    params = dict(site.module.named_parameters(recurse=False))
    return {name: (layout, 0) for name in _names(site) if name in params
            and (layout := heads_layout(params[name].shape[0], site.heads)) is not None}


def _rows(site: Site) -> dict[str, int]:
    per_head = _per_head(site)
    return {name: 0 for name in _names(site) if name not in per_head}


def _collectives(site: Site) -> tuple[int, int]:
    """Rows stored whole (heads split balanced): each one's gradient is all-reduced in the backward."""
    return 0, stored_whole(_per_head(site), site.tp)


SHARD_ROWS = Style(
    name="shard_rows", build=lambda site: ShardRows(params=site.args.params, lend=site.args.lend, heads=site.heads),
    args=ShardRowsArgs, sharded_dims=_rows, layouts=lambda site: _per_head(site) or None, collectives=_collectives,
    reads=Act.ANY,
    doc="own parameters with a row per head or channel (GPT-OSS sinks, Mamba's A_log): sharded on dim 0, "
        "one row per query head as the heads split")
