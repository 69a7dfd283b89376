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
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module

from .errors import SizeError
from .layout_styles import ColwiseLayout, lend_during_forward, lend_local_params, local_of, place_parameter
from .layouts import Layout, Part

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
    b, c = Part(groups, state, name="B groups", unit="groups"), Part(groups, state, name="C groups", unit="groups")
    per_head = Layout((Part(heads, 1, name="heads", unit="heads"),))
    found = {"in_proj.weight": (Layout((z, x, b, c, Part(heads, 1, name="dt heads", unit="heads"))), 0),
             "conv1d.weight": (Layout((x, b, c)), 0),
             "norm.weight": (Layout((Part(groups, heads * head_dim // groups, name="norm groups", unit="groups"),)), 0)}
    if mixer.in_proj.bias is not None:
        found["in_proj.bias"] = (found["in_proj.weight"][0], 0)
    if mixer.conv1d.bias is not None:
        found["conv1d.bias"] = (found["conv1d.weight"][0], 0)
    found.update({name: (per_head, 0) for name in OWN})
    found["out_proj.weight"] = (Layout((x,)), 1)
    return found


class _ColwiseWith(ColwiseLayout):
    """ColwiseLayout with a layout given whole, not built from parts and heads."""

    def __init__(self, layout: Layout):
        super().__init__()
        self.layout = layout

    def layouts(self, module: nn.Module) -> dict[str, tuple[Layout, int]]:
        return {name: (self.layout, 0) for name in ("weight", "bias") if getattr(module, name, None) is not None}


class Mamba2Mixer(ParallelStyle):
    """Shard a transformers Mamba-2 mixer by heads and groups (see the module docstring).

    Needs ``num_heads`` and ``n_groups`` divisible by the tensor-parallel size: a rank's heads
    must read only its own groups' B and C, and its norm groups must be whole.

    Example::
        >>> parallelize_module(model, mesh, {"backbone.layers.*.mixer": Mamba2Mixer()})
    """

    def layouts(self, module: nn.Module) -> dict[str, tuple[Layout, int]]:
        return mixer_layouts(module)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        tp = device_mesh.size()
        layouts = mixer_layouts(module)
        problems = [p for layout, _ in layouts.values() for p in layout.problems(tp)]
        if problems:
            raise SizeError(f"{type(module).__name__}: {'; '.join(dict.fromkeys(problems))}; use a tensor-parallel "
                            "size that divides the heads and the groups")
        parallelize_module(module.in_proj, device_mesh, _ColwiseWith(layouts["in_proj.weight"][0]))
        parallelize_module(module.out_proj, device_mesh, _rowwise())
        for path, (layout, dim) in layouts.items():
            owner, _, name = path.rpartition(".")
            if owner not in ("in_proj", "out_proj"):  # their styles place them
                place_parameter(module.get_submodule(owner) if owner else module, name, layout, dim, device_mesh)
        norm = module.norm
        lend_during_forward(norm, lambda: lend_local_params(norm, ("weight",), lambda n, p: local_of(p)))

        def lend():  # the mixer reads conv1d's weight and its own per-head parameters directly
            lend_local_params(module, OWN, lambda n, p: local_of(p))
            lend_local_params(module.conv1d, ("weight", "bias"), lambda n, p: local_of(p))

        lend_during_forward(module, lend, [module.conv1d])
        self._set_local_sizes(module, tp)
        return module

    @staticmethod
    def _set_local_sizes(module: nn.Module, tp: int) -> None:
        for attr in ("num_heads", "n_groups", "intermediate_size"):
            setattr(module, attr, getattr(module, attr) // tp)
        channels = local_of(module.conv1d.weight).shape[0]
        module.conv_dim = module.conv1d.in_channels = module.conv1d.out_channels = module.conv1d.groups = channels

    def __repr__(self) -> str:
        return "Mamba2Mixer()"


def _rowwise() -> ParallelStyle:
    from .styles import OwnedRowwiseParallel

    return OwnedRowwiseParallel()
