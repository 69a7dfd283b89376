"""Tensor parallelism inside a Mamba-2 mixer: its heads and groups split over the ranks.

A Mamba-2 mixer projects its input once (``in_proj``) into five parts, ``[z | x | B | C | dt]``:
the gate and the input of ``num_heads`` heads of ``head_dim`` channels, B and C for ``n_groups``
groups of ``ssm_state_size``, and one time step per head. A depthwise ``conv1d`` runs over
``[x | B | C]``, the scan runs per head (each head reads its group's B and C), a gated RMS norm
normalises each group's channels, and ``out_proj`` maps the channels back. Megatron's recipe
for it: every rank takes its block of heads and of groups in every part (``in_proj`` is
column-parallel with that layout, ``conv1d``, ``dt_bias``, ``A_log``, ``D`` and the norm hold the
same rows), the scan and the norm run on the rank's own heads and groups, and ``out_proj`` is
row-parallel: one all-reduce in the forward and one, for the input, in the backward.

Under sequence parallelism the convolution and the scan need the whole sequence: the mixer
gathers its sequence-sharded input once (an all-gather; in the backward its gradient, partial on
each rank, is reduce-scattered), runs as above, and ``out_proj`` reduce-scatters its partial
output along the sequence instead of all-reducing it, as Megatron runs a dense MLP.
"""

from __future__ import annotations

from functools import partial

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import parallelize_module

from ..sharding.layouts import Layout, Part
from ..sharding.lending import lend_during_forward, lend_local_params
from ..sharding.tags import local_rows, module_layouts, place_parameter
from .descriptor import Site, Style
from .gathered_norm import GatheredNorm
from .linear import SequenceArgs
from .mixer import MixerParallel, stream
from .shard_rows import ShardRows

# the mixer's attributes that hold sizes, and the parameters the mixer reads directly
SIZES = ("num_heads", "head_dim", "n_groups", "ssm_state_size", "intermediate_size")
OWN = ("dt_bias", "A_log", "D")


def mixer_layouts(mixer: nn.Module) -> dict[str, tuple[Layout, int]]:
    """``child.parameter`` (or own parameter) -> (layout, sharded dimension), out_proj's input
    features included."""
    missing = [a for a in SIZES if not isinstance(getattr(mixer, a, None), int)]
    if missing or not all(hasattr(mixer, m) for m in ("in_proj", "conv1d", "norm", "out_proj")):
        raise NotImplementedError(
            f"mamba2_mixer supports transformers' Mamba-2 mixers (in_proj, conv1d, norm, out_proj and the sizes "
            f"{', '.join(SIZES)}), but {type(mixer).__name__} lacks {', '.join(missing) or 'some of those modules'}")
    heads, head_dim, groups, state = (getattr(mixer, a) for a in SIZES[:4])
    z, x = Part(heads, head_dim, name="z heads", unit="heads"), Part(heads, head_dim, name="x heads", unit="heads")
    # fewer groups than ranks: each rank holds the group its heads read (as kv heads under GQA)
    b = Part(groups, state, replicable=True, name="B groups", unit="groups")
    c = Part(groups, state, replicable=True, name="C groups", unit="groups")
    per_head = Layout((Part(heads, 1, name="heads", unit="heads"),))
    found = {"in_proj.weight": (Layout((z, x, b, c, Part(heads, 1, name="dt heads", unit="heads"))), 0),
             "conv1d.weight": (Layout((x, b, c)), 0)}
    if getattr(mixer.norm, "weight", None) is not None:
        found["norm.weight"] = (Layout((Part(groups, heads * head_dim // groups, name="norm groups",
                                             unit="groups", replicable=True),)), 0)
    if mixer.in_proj.bias is not None:
        found["in_proj.bias"] = (found["in_proj.weight"][0], 0)
    if mixer.conv1d.bias is not None:
        found["conv1d.bias"] = (found["conv1d.weight"][0], 0)
    found.update({name: (per_head, 0) for name in OWN})
    found["out_proj.weight"] = (Layout((x,)), 1)
    return found


def mixer_collectives(site: Site) -> tuple[int, int]:
    """(forward, backward) collectives of one sharded mixer: out_proj's all-reduce and in_proj's
    input gradient; with fewer groups than ranks also the norm's two all-gathers (input and gate)
    and their reduce-scatters, its weight's gradient, and the replicated B and C rows' gradients
    of in_proj and conv1d (one all-reduce per parameter)."""
    mixer, tp = site.module, site.tp
    # under sequence parallelism: the input's all-gather and out_proj's reduce-scatter, and their mirror
    base = 2 if site.args.sequence_dim is not None else 1
    if mixer.n_groups % tp == 0:
        return base, base
    replicated = sum(p is not None for p in (mixer.in_proj.weight, mixer.in_proj.bias,
                                             mixer.conv1d.weight, mixer.conv1d.bias))
    return base + 2, base + 2 + len(list(mixer.norm.parameters())) + replicated


class Mamba2Mixer(MixerParallel):
    """Shard a transformers Mamba-2 mixer by heads and groups (see the module docstring).

    ``num_heads`` must divide by the tensor-parallel size, and ``n_groups`` either divide by it or
    divide it. With fewer groups than ranks (one group, as most Mamba-2 checkpoints), each rank
    holds the B and C of the group its heads read, their gradients summed over the ranks that
    share it, and the gated norm, whose groups then span ranks, runs on all-gathered channels
    (``GatheredNorm``): one all-gather more in the forward.

    Keyword Args:
        sequence_dim (int, optional): under sequence parallelism (see ``MixerParallel``). Default: None.

    Example::
        >>> parallelize_module(model, mesh, {"backbone.layers.*.mixer": Mamba2Mixer()})
        >>> parallelize_module(model, mesh, {"backbone.layers.*.mixer": Mamba2Mixer(sequence_dim=1)})
    """

    name, sizes = "mamba2_mixer", "the heads and the groups"

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        tp = device_mesh.size()
        layouts = mixer_layouts(module)
        self._shard_ends(module, device_mesh, layouts)
        # per-head parameters, and the norm's groups when each rank holds whole ones: equal row blocks
        parallelize_module(module, device_mesh, ShardRows(params=OWN))
        if "norm.weight" in layouts:
            # with fewer groups than ranks a norm group spans ranks: the norm runs on gathered channels
            norm_style = ShardRows() if module.n_groups % tp == 0 else GatheredNorm()
            parallelize_module(module.norm, device_mesh, norm_style)
        conv = tuple(name for name in ("weight", "bias") if f"conv1d.{name}" in layouts)
        for name in conv:
            place_parameter(module.conv1d, name, layouts[f"conv1d.{name}"][0], 0, device_mesh)
        # the mixer reads conv1d's weight directly, without calling conv1d
        lend_during_forward(module, lambda: lend_local_params(module.conv1d, conv, partial(local_rows, module.conv1d)),
                            [module.conv1d])
        self._set_local_sizes(module, tp)
        return module

    @staticmethod
    def _set_local_sizes(module: nn.Module, tp: int) -> None:
        for attr in ("num_heads", "intermediate_size"):
            setattr(module, attr, getattr(module, attr) // tp)
        module.n_groups = max(module.n_groups // tp, 1)
        shard = module_layouts(module.conv1d).get("weight")
        channels = len(shard.layout.rows(tp, shard.mesh.get_local_rank())) if shard else module.conv1d.out_channels
        module.conv_dim = module.conv1d.in_channels = module.conv1d.out_channels = module.conv1d.groups = channels


MAMBA2_MIXER = Style(
    name="mamba2_mixer", build=lambda site: Mamba2Mixer(sequence_dim=site.args.sequence_dim), args=SequenceArgs,
    doc="a Mamba-2 mixer split by heads and groups: in_proj, conv1d and the scan per rank, out_proj row-parallel "
        "(under sequence parallelism its input all-gathered, out_proj's output reduce-scattered)",
    reads=stream, leaves=stream, layouts=lambda site: mixer_layouts(site.module),
    collectives=mixer_collectives, takes_sequence_dim=True)
