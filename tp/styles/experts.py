"""Tensor parallelism inside packed mixture-of-experts tensors (transformers 5 ``*Experts`` modules).

transformers 5 stores all experts of a layer in two 3-D parameters: ``gate_up_proj``
``[experts, 2 * intermediate, hidden]`` (gate rows, then up rows) and ``down_proj``
``[experts, hidden, intermediate]``. Every expert is an MLP, so Megatron's recipe applies to
each: its gate and up rows column-parallel, its down projection row-parallel. Every rank
keeps every expert and the router's choices stay the same on every rank; each rank computes
its slice of every chosen expert's intermediate features, and one all-reduce sums the outputs.

Under sequence parallelism the experts see the tokens flattened (batch x sequence), so they
cannot shard the sequence themselves: their block (the MoE module holding the router and the
experts) gathers the sequence once before the router (``sequence_block``), and the experts
leave their output as partial sums, which the block reduce-scatters along the sequence (where a
sharded shared expert adds its own all-reduced output, the experts all-reduce theirs as without
sequence parallelism, and the block cuts the sum).
"""

from __future__ import annotations

from functools import partial

import torch
from pydantic import Field
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate

from ..errors import SizeError
from ..sharding.collectives import to_local
from ..sharding.layouts import Layout, Part
from ..sharding.lending import lend_local_params, take_back_params
from ..sharding.tags import local_rows, place_parameter
from .descriptor import Act, Args, PlainStyle, Style

# parameter -> (dimension holding the intermediate features, parts packed along it)
EXPERT_PARAMS = {"gate_up_proj": (1, 2), "down_proj": (2, 1)}
GROUPED_MM_ALIGNMENT = 16  # bytes: torch's grouped matmul wants every stride a multiple of it


def expert_layouts(module: nn.Module) -> dict[str, tuple[Layout, int]]:
    """Layouts of a packed experts module's parameters; NotImplementedError for other modules."""
    names = {n for n, _ in module.named_parameters(recurse=False)}
    if names != set(EXPERT_PARAMS):
        raise NotImplementedError(
            f"experts supports modules holding exactly {', '.join(EXPERT_PARAMS)} (transformers 5 packed "
            f"experts without biases), but {type(module).__name__} holds {', '.join(sorted(names))}; "
            "leave it out of the plan to keep it whole on every rank")
    found = {}
    for name, (dim, parts) in EXPERT_PARAMS.items():
        param = getattr(module, name)
        size, multiple, why = param.shape[dim], 1, ""
        if dim == param.dim() - 1 and getattr(getattr(module, "config", None), "_experts_implementation", None) \
                == "grouped_mm":
            # the sharded dimension is the innermost one: its width is a row stride of the local weight
            multiple = GROUPED_MM_ALIGNMENT // param.element_size()
            why = (f"the {GROUPED_MM_ALIGNMENT} bytes per row that grouped_mm needs; choose a tensor-parallel size "
                   "that keeps them aligned, or set config._experts_implementation = 'eager'")
        found[name] = (Layout(tuple(Part(size // parts, 1, name=f"{name} part {i}", unit="rows", multiple=multiple,
                                         why_multiple=why) for i in range(parts))), dim)
    return found


class ExpertsArgs(Args):
    sequence_dim: int | None = Field(None, description="set by the plan under sequence parallelism: the "
                                     "outputs leave as partial sums, for the block to reduce-scatter")


class PackedExperts(PlainStyle):
    """Shard every expert of a packed experts module on its intermediate features.

    ``gate_up_proj`` keeps, for each expert, this rank's slice of the gate rows and of the up
    rows (stored as two parameters, ``gate_up_proj_part0`` and ``_part1``: tp/sharding/fused.py);
    ``down_proj`` is sharded on dim 2. The module's own forward runs on the local shards: the routing
    weights and the hidden states come in replicated, the expert outputs leave partial and
    are all-reduced (or, with ``partial_output``, left as a partial DTensor for the enclosing
    block to reduce-scatter). Their input gradients are partial on each rank: the hidden states'
    gradient is summed where the input was replicated (or here, for a plain input), and the
    routing weights' gradient, which the router needs whole, is all-reduced here.

    Example::
        >>> parallelize_module(model, mesh, {"layers.*.mlp.experts": PackedExperts()})
    """

    def __init__(self, *, partial_output: bool = False):
        self.partial_output = partial_output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        tp = device_mesh.size()
        layouts = expert_layouts(module)
        for name, (layout, dim) in layouts.items():
            problems = layout.problems(tp)
            if problems:
                raise SizeError(f"{type(module).__name__}.{name}: {'; '.join(problems)}")
            place_parameter(module, name, layout, dim, device_mesh)
        module.register_forward_pre_hook(partial(self._lend_local, device_mesh), with_kwargs=True)
        module.register_forward_hook(partial(self._take_back, device_mesh), always_call=True)
        return module

    @staticmethod
    def _replicated(x, mesh):
        """A local view of a replicated input whose gradient is summed over the ranks."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return x.to_local() if isinstance(x, DTensor) else x
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
        return x.to_local(grad_placements=[Partial()])

    def _lend_local(self, device_mesh, module, args, kwargs):
        args = tuple(self._replicated(a, device_mesh) for a in args)
        kwargs = {k: self._replicated(v, device_mesh) for k, v in kwargs.items()}
        lend_local_params(module, EXPERT_PARAMS, partial(local_rows, module))
        return args, kwargs

    def _take_back(self, device_mesh, module, args, output):
        if take_back_params(module) is None or output is None:
            return None
        total = DTensor.from_local(output, device_mesh, [Partial()], run_check=False)
        if self.partial_output:
            return total
        return to_local(total.redistribute(device_mesh, [Replicate()]))

    def __repr__(self) -> str:
        return f"PackedExperts(partial_output={self.partial_output})" if self.partial_output else "PackedExperts()"


def _partial_output(args: ExpertsArgs) -> bool:
    return args.sequence_dim is not None


# The expert outputs' all-reduce (under sequence parallelism, their block's reduce-scatter instead);
# the routing weights' gradient, and a plain input's.
EXPERTS = Style(
    name="experts", build=lambda site: PackedExperts(partial_output=_partial_output(site.args)), args=ExpertsArgs,
    doc="packed 3-D experts (gate_up_proj, down_proj): every expert sharded on its intermediate features",
    reads=Act.REPLICATED, leaves=lambda args: Act.PARTIAL if _partial_output(args) else Act.REPLICATED,
    layouts=lambda site: expert_layouts(site.module),
    collectives=lambda site: (int(not _partial_output(site.args)), 1 + int(site.plain_input)),
    takes_sequence_dim=True, flattens_sequence=True)
