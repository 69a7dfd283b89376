"""``per_head_norms``: a list of norms, one per attention head, zipped with the heads in its forward.

StableLM 2 (``qk_layernorm``) normalises q and k with ``StableLmLayerNormPerHead``: a ModuleList
``norms`` of one ``LayerNorm(head_dim)`` per head, each applied to its head of the input
``[batch, heads, seq, head_dim]``. Once the heads are split, a rank's input holds only its own
heads, so the list must hold only their norms while the module runs. ``head_norm`` covers a norm
with one weight (or one weight row per head) instead.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ParallelStyle

from ..errors import SizeError
from ..sharding.collectives import f
from ..sharding.layouts import Part
from ..sharding.lending import lend_local_params, local_of, take_back_params
from ..sharding.tags import replicated_parameter
from .descriptor import Act, Args, Style


class PerHeadNorms(ParallelStyle):
    """Run each rank's heads through their own norms, in a module that holds one norm per head.

    While the module runs, its list of norms is the list of this rank's heads' norms: its query
    heads, or, for key heads, the kv heads it holds (with more ranks than kv heads, rank ``r``
    holds kv head ``r * kv // tp``, as the kv projections' layout gives it). The module's own
    forward runs unchanged.

    Every norm's parameters stay whole on every rank, as replicated DTensors: a DTensor on the
    one TP mesh cannot live on one rank alone, and a checkpoint names each norm's parameters
    (``norms.0.weight``, ...), so ``tp.full_state_dict`` and the checkpoints see the list as it
    was. They are small (``heads x head_dim`` values per list). Each rank computes the gradients
    of its own norms only, so the gradients of the whole list are summed over the ranks: one
    all-reduce per module in the backward (Megatron's ``f`` on their concatenation), which leaves
    the same gradients on every rank, replicas' contributions added.

    Keyword Args:
        heads: ``"q"`` (one norm per query head) or ``"kv"`` (one per key/value head).
        norms: the name of the ModuleList child. Default: ``"norms"``.

    Example::
        >>> parallelize_module(model, mesh, {"layers.0.self_attn.q_layernorm": PerHeadNorms(heads="q"),
        ...                                  "layers.0.self_attn.k_layernorm": PerHeadNorms(heads="kv")})
    """

    def __init__(self, *, heads: Literal["q", "kv"], norms: str = "norms"):
        super().__init__()
        self.heads, self.norms = heads, norms

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        norms = getattr(module, self.norms, None)
        if not isinstance(norms, nn.ModuleList):
            raise NotImplementedError(f"per_head_norms: {type(module).__name__} has no ModuleList {self.norms!r} "
                                      "of one norm per head")
        tp = device_mesh.size()
        heads = Part(len(norms), 1, replicable=self.heads == "kv", name=f"{type(module).__name__}.{self.norms}",
                     unit=f"{self.heads} heads")
        problem = heads.problem(tp)
        if problem:
            raise SizeError(f"per_head_norms: {problem}; use a tensor-parallel size that splits the heads")
        held = nn.ModuleList([norms[i] for i in heads.local_units(tp, device_mesh.get_local_rank())])
        params = [(norm, name) for norm in norms for name, p in norm.named_parameters(recurse=False)]
        for norm, name in params:
            norm.register_parameter(name, replicated_parameter(norm._parameters[name], device_mesh))
        group = device_mesh.get_group() if tp > 1 else None

        def lend(mod, args):
            values = [local_of(norm._parameters[name]) for norm, name in params]
            flat = torch.cat([v.reshape(-1) for v in values]) if values else None
            if flat is not None and flat.requires_grad and group is not None:
                flat = f(flat, group)  # every rank's gradient covers its own heads' norms: summed
            pieces = dict(zip(params, flat.split([v.numel() for v in values]), strict=True)) if values else {}
            for norm in held:
                lend_local_params(norm, [n for n, _ in norm.named_parameters(recurse=False)],
                                  lambda name, p, norm=norm: pieces[(norm, name)].view(p.shape))
            mod._modules[self.norms] = held

        def take_back(mod, args, output):
            mod._modules[self.norms] = norms
            for norm in held:
                take_back_params(norm)

        module.register_forward_pre_hook(lend)
        module.register_forward_hook(take_back, always_call=True)
        return module

    def __repr__(self) -> str:
        return f"PerHeadNorms(heads={self.heads!r}, norms={self.norms!r})"


class PerHeadNormsArgs(Args):
    heads: Literal["q", "kv"]
    norms: str = "norms"


# One all-reduce in the backward: the gradients of the whole list, summed.
PER_HEAD_NORMS = Style(
    name="per_head_norms", build=lambda site: PerHeadNorms(heads=site.args.heads, norms=site.args.norms),
    args=PerHeadNormsArgs, reads=Act.FEATURES, leaves=Act.FEATURES, collectives=lambda site: (0, 1),
    doc="a list of norms, one per attention head (StableLM 2's q/k LayerNorms): each rank runs its heads' norms, "
        "kept whole, gradients summed")
