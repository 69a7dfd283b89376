"""Tensor parallelism inside a Mamba (Mamba-1) mixer: its channels split over the ranks.

A Mamba mixer projects its input once (``in_proj``) into ``[x | gate]``, each ``intermediate_size``
channels wide. A depthwise ``conv1d`` runs over x, ``x_proj`` reduces the channels to the time step
rank, B and C (read by every channel), ``dt_proj`` maps the time step back to one per channel, the
scan runs per channel with ``A_log`` and ``D``, and ``out_proj`` maps the gated channels back.
Megatron's split applied to the channels: ``in_proj`` is column-parallel in its two parts, each
rank runs the convolution, ``dt_proj`` and the scan on its own channels, and ``out_proj`` is
row-parallel. ``x_proj`` is row-parallel too, and its all-reduced output is read by the sharded
channels, so its gradient is summed as well (``RowwiseIntoSharded``). The mixer reads the weights
of ``conv1d`` and ``dt_proj`` directly instead of calling them, so it is lent their local rows.
2 all-reduces per mixer forward (x_proj, out_proj) and 2 backward (x_proj's output, the input).

Under sequence parallelism the convolution and the scan need the whole sequence: the mixer gathers
its sequence-sharded input once (``tp.styles.mixer``; its gradient is reduce-scattered), and
``out_proj`` reduce-scatters its partial output along the sequence instead of all-reducing it.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import parallelize_module

from ..sharding.layouts import Layout, Part
from .descriptor import Site, Style
from .linear import RowwiseIntoSharded, SequenceArgs
from .mixer import MixerParallel, stream
from .shard_rows import ShardRows

# the children the mixer calls, those whose weights it reads directly, and its own per-channel parameters
CHILDREN = ("in_proj", "conv1d", "x_proj", "dt_proj", "out_proj")
READ_DIRECTLY = ("conv1d", "dt_proj")
OWN = ("A_log", "D")


def mixer_layouts(mixer: nn.Module) -> dict[str, tuple[Layout, int]]:
    """``child.parameter`` (or own parameter) -> (layout, sharded dimension)."""
    missing = [name for name in (*CHILDREN, *OWN) if not hasattr(mixer, name)]
    if missing or not isinstance(getattr(mixer, "intermediate_size", None), int):
        raise NotImplementedError(
            f"mamba_mixer supports transformers' Mamba mixers ({', '.join((*CHILDREN, *OWN))} and "
            f"intermediate_size), but {type(mixer).__name__} lacks {', '.join(missing) or 'intermediate_size'}")
    channels = mixer.intermediate_size
    rows = Layout((Part(channels, 1, name="channels", unit="channels"),))
    in_proj = Layout((Part(channels, 1, name="x channels", unit="channels"),
                      Part(channels, 1, name="gate channels", unit="channels")))
    found = {f"in_proj.{name}": (in_proj, 0) for name in ("weight", "bias")
             if getattr(mixer.in_proj, name, None) is not None}
    for child in READ_DIRECTLY:
        found.update({f"{child}.{name}": (rows, 0) for name in ("weight", "bias")
                      if getattr(getattr(mixer, child), name, None) is not None})
    found.update({name: (rows, 0) for name in OWN})
    found.update({"x_proj.weight": (rows, 1), "out_proj.weight": (rows, 1)})
    return found


def mixer_collectives(site: Site) -> tuple[int, int]:
    """(forward, backward) collectives of one sharded mixer: x_proj's all-reduce and out_proj's
    (forward), x_proj's output gradient and the input's (backward); under sequence parallelism
    out_proj reduce-scatters, and the input's all-gather and its mirror come on top."""
    return (3, 3) if site.args.sequence_dim is not None else (2, 2)


class MambaMixer(MixerParallel):
    """Shard a transformers Mamba mixer (Mamba, Falcon-Mamba, Jamba) by channels (see the module docstring).

    ``intermediate_size`` must divide by the tensor-parallel size.

    Keyword Args:
        sequence_dim (int, optional): under sequence parallelism (see ``MixerParallel``). Default: None.

    Example::
        >>> parallelize_module(model, mesh, {"backbone.layers.*.mixer": MambaMixer()})
        >>> parallelize_module(model, mesh, {"backbone.layers.*.mixer": MambaMixer(sequence_dim=1)})
    """

    name, sizes = "mamba_mixer", "the intermediate size"

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self._shard_ends(module, device_mesh, mixer_layouts(module))
        parallelize_module(module.x_proj, device_mesh, RowwiseIntoSharded())
        for child in READ_DIRECTLY:
            parallelize_module(getattr(module, child), device_mesh, ShardRows())
        parallelize_module(module, device_mesh, ShardRows(params=OWN, lend=READ_DIRECTLY))
        channels = module.intermediate_size // device_mesh.size()
        module.intermediate_size = channels
        module.conv1d.in_channels = module.conv1d.out_channels = module.conv1d.groups = channels
        return module


MAMBA_MIXER = Style(
    name="mamba_mixer", build=lambda site: MambaMixer(sequence_dim=site.args.sequence_dim), args=SequenceArgs,
    doc="a Mamba mixer split by channels: in_proj column-parallel in [x | gate], conv1d, dt_proj and the scan "
        "per rank, x_proj and out_proj row-parallel (under sequence parallelism its input all-gathered, "
        "out_proj's output reduce-scattered)",
    reads=stream, leaves=stream, layouts=lambda site: mixer_layouts(site.module),
    collectives=mixer_collectives, takes_sequence_dim=True)
