"""The dataflow of a model's repeated blocks, traced, and the Megatron plan it implies.

One forward of the model on a few tokens runs under a ``TorchFunctionMode`` that labels every
tensor with where it came from: ``stream`` (the block's input, the residual stream), the
linears (or packed-experts modules) whose outputs it depends on, and the parameters it was
computed from. From the labels:

- a linear *reads the stream* when its input depends on the block input through no other linear;
- a linear *feeds the stream* when the block's output depends on its output through no other
  linear;
- each linear that feeds the stream and reads only the outputs of other linears is a row-parallel
  candidate; the linears it reads are its column-parallel partners, valid when they read only
  replicated values (the stream, or linears kept whole) and feed nothing else;
- a parameter outside the planned linears that meets a column-parallel output (a per-head norm,
  a learnable scalar) sits in the sharded region: its gradient is partial on each rank and must
  be summed.

Anything that does not fit stays whole. The result is a candidate: ``tp.trial`` runs it against
the unsharded model before it is trusted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from ..styles.linear import LINEAR_TYPES

STREAM = "stream"
_SPLITS = {"split", "chunk", "tensor_split", "unbind", "split_with_sizes"}
_IN_PLACE = {"__setitem__", "__iadd__", "__imul__", "__isub__", "__itruediv__"}


def is_packed_experts(module: nn.Module) -> bool:
    """A transformers 5 experts module: its experts' weights packed in 3-D parameters."""
    return any(p.dim() == 3 for p in module.parameters(recurse=False))


def block_signature(block: nn.Module) -> tuple:
    """Blocks with the same submodules of the same classes share a plan."""
    return tuple((path, type(m).__name__) for path, m in block.named_modules())


@dataclass
class Node:
    """A linear or packed-experts module of a block, as the trace saw it."""

    path: str  # relative to the block
    kind: str  # "linear" or "experts"
    inputs: set[str] = field(default_factory=set)  # labels of its input(s)
    split: tuple[int, ...] | None = None  # sizes its output is cut into along the last dim


@dataclass
class BlockFlow:
    """What one block's trace found."""

    nodes: dict[str, Node]
    feeds_stream: set[str]  # node paths
    params_met: dict[str, set[str]]  # parameter path (relative) -> node paths whose outputs it met

    def readers(self, path: str) -> set[str]:
        label = f"node:{path}"
        return {p for p, n in self.nodes.items() if label in n.inputs}

    def reads_stream(self, path: str) -> bool:
        return STREAM in self.nodes[path].inputs


class _Labeller(TorchFunctionMode):
    def __init__(self, params: dict[int, str], node_outputs: dict[int, str]):
        super().__init__()
        self.labels: dict[int, frozenset[str]] = {}
        self.alive: list[torch.Tensor] = []  # keeps labelled tensors alive, so their ids stay theirs
        self.params = params
        self.node_outputs = node_outputs  # id of a node's output -> node path
        self.params_met: dict[str, set[str]] = {}
        self.splits: dict[str, tuple[int, ...]] = {}

    def label_of(self, t: torch.Tensor) -> frozenset[str]:
        found = self.labels.get(id(t), frozenset())
        name = self.params.get(id(t))
        return found | {f"param:{name}"} if name else found

    def set_label(self, t: torch.Tensor, labels) -> None:
        self.labels[id(t)] = frozenset(labels)
        self.alive.append(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        labels = frozenset().union(*(self.label_of(t) for t in tensors))
        if not labels:
            return out
        nodes = {label[5:] for label in labels if label.startswith("node:")}
        for label in labels:
            if label.startswith("param:") and nodes:
                self.params_met.setdefault(label[6:], set()).update(nodes)
        name = getattr(func, "__name__", "")
        if name in _SPLITS and tensors and id(tensors[0]) in self.node_outputs:
            self._record_split(tensors[0], out, args, kwargs)
        elif tensors and id(tensors[0]) in self.node_outputs and len(nodes) == 1 and \
                isinstance(out, torch.Tensor) and out.shape == tensors[0].shape:
            # the same features, changed element by element (DBRX clamps qkv before splitting it)
            self.node_outputs[id(out)] = self.node_outputs[id(tensors[0])]
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.set_label(t, labels | self.labels.get(id(t), frozenset()))
        if (name.endswith("_") or name in _IN_PLACE) and tensors:
            self.set_label(tensors[0], labels)
        return out

    def _record_split(self, source, out, args, kwargs) -> None:
        dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
        pieces = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if isinstance(dim, int) and dim % source.dim() == source.dim() - 1 and len(pieces) > 1:
            self.splits[self.node_outputs[id(source)]] = tuple(p.shape[-1] for p in pieces)


def _first_tensor(args, kwargs, key: str = "hidden_states"):
    if key in kwargs and isinstance(kwargs[key], torch.Tensor):
        return kwargs[key]
    return next((a for a in args if isinstance(a, torch.Tensor)), None)


def trace_blocks(model: nn.Module, blocks: list[str], run) -> dict[tuple, BlockFlow]:
    """Trace the first block of every distinct structure among ``blocks`` during ``run()``
    (a forward of ``model``). Returns block signature -> BlockFlow."""
    firsts: dict[tuple, str] = {}
    for path in blocks:
        firsts.setdefault(block_signature(model.get_submodule(path)), path)
    flows: dict[tuple, BlockFlow] = {}
    handles = []
    for signature, path in firsts.items():
        handles += _BlockTracer(model.get_submodule(path), signature, flows).handles
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    # keyed by the structure the forward left: BigBird swaps its sparse attention for full
    # attention on short inputs, for good
    return {block_signature(model.get_submodule(firsts[signature])): flow for signature, flow in flows.items()}


class _BlockTracer:
    """Hooks on one block and its linears and experts that record the block's dataflow once per
    block structure (``signature``) into ``flows``: which labels each node reads, and which
    nodes feed the block's output (the residual stream)."""

    def __init__(self, block: nn.Module, signature: tuple, flows: dict):
        self.signature, self.flows = signature, flows
        self.params = {id(p): name for name, p in block.named_parameters()}
        self.nodes: dict[str, Node] = {}
        self.node_outputs: dict[int, str] = {}
        self.labeller: _Labeller | None = None  # set while the block's forward runs
        self.handles = [block.register_forward_pre_hook(self.enter, with_kwargs=True),
                        block.register_forward_hook(self.leave, with_kwargs=True, always_call=True)]
        for path, module in block.named_modules():
            kind = "linear" if isinstance(module, LINEAR_TYPES) else "experts" if is_packed_experts(module) else None
            if kind:
                before, after = partial(self.before_node, path, kind), partial(self.after_node, path)
                self.handles += [module.register_forward_pre_hook(before, with_kwargs=True),
                                 module.register_forward_hook(after, with_kwargs=True)]

    def enter(self, module, args, kwargs):
        if self.signature in self.flows or self.labeller is not None:
            return
        self.labeller = _Labeller(self.params, self.node_outputs)
        hidden = _first_tensor(args, kwargs)
        if hidden is not None:
            self.labeller.set_label(hidden, {STREAM})
        self.labeller.__enter__()

    def leave(self, module, args, kwargs, output):
        labeller, self.labeller = self.labeller, None
        if labeller is None:
            return
        labeller.__exit__(None, None, None)
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        out_labels = labeller.label_of(hidden) if isinstance(hidden, torch.Tensor) else frozenset()
        for path, split in labeller.splits.items():
            self.nodes[path].split = split
        self.flows[self.signature] = BlockFlow(
            nodes=dict(self.nodes),
            feeds_stream={label[5:] for label in out_labels if label.startswith("node:")},
            params_met=labeller.params_met,
        )

    def before_node(self, path: str, kind: str, module, args, kwargs):
        if self.labeller is None:
            return
        node = self.nodes.setdefault(path, Node(path, kind))
        chosen = [_first_tensor(args, kwargs)] if kind == "linear" else \
            [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        for t in chosen:
            if t is not None:
                node.inputs |= {label for label in self.labeller.label_of(t) if not label.startswith("param:")}

    def after_node(self, path: str, module, args, kwargs, output):
        if self.labeller is None:
            return
        for t in pytree.tree_leaves(output):
            if isinstance(t, torch.Tensor):
                self.labeller.set_label(t, {f"node:{path}"})
                self.node_outputs[id(t)] = path


@dataclass
class Unit:
    """A Megatron pair: column-parallel linears feeding one row-parallel linear (or packed experts)."""

    row: str
    columns: tuple[str, ...]
    splits: dict[str, tuple[int, ...]] = field(default_factory=dict)
    grad_sums: tuple[str, ...] = ()  # parameters in the sharded region: gradients summed

    def members(self) -> tuple[str, ...]:
        return (*self.columns, self.row)


@dataclass
class BlockPlan:
    units: list[Unit]
    kept: dict[str, str]  # node path -> why it stays whole


def plan_block(flow: BlockFlow, keep: set[str] = frozenset()) -> BlockPlan:
    """Units of a traced block; ``keep``: node paths that must stay whole (built-in keep list)."""
    kept: dict[str, str] = {p: "in the keep list" for p in keep if p in flow.nodes}
    for path, node in flow.nodes.items():
        if node.kind == "linear" and flow.reads_stream(path) and path in flow.feeds_stream:
            kept.setdefault(path, "reads and feeds the residual stream directly")
        elif path not in flow.feeds_stream and not flow.readers(path):
            kept.setdefault(path, "its output reaches neither the residual stream nor another linear")
    units: dict[str, Unit] = {}
    changed = True
    while changed:  # keeping one linear whole can make its readers' units valid or invalid
        changed = False
        units = {}
        replicated = {STREAM} | {f"node:{p}" for p in kept} | {f"node:{p}" for p in flow.feeds_stream}
        for row in [p for p in flow.nodes if p in flow.feeds_stream]:  # in call order, same on every rank
            if row in kept:
                continue
            unit, reason = _unit(flow, row, replicated, kept)
            if unit is None:
                for path in (row, *sorted(_sources(flow, row))):
                    if path not in kept and path in flow.nodes:
                        kept[path] = reason
                        changed = True
                break
            units[row] = unit
    claimed = {m for u in units.values() for m in u.members()}
    for path in flow.nodes:
        if path not in claimed:
            kept.setdefault(path, "not part of a column -> row pair")
    for unit in units.values():
        unit.grad_sums = _grad_sums(flow, unit, claimed)
    return BlockPlan(list(units.values()), kept)


def _sources(flow: BlockFlow, path: str) -> set[str]:
    return {label[5:] for label in flow.nodes[path].inputs if label.startswith("node:")}


def _unit(flow: BlockFlow, row: str, replicated: set[str], kept: dict) -> tuple[Unit | None, str]:
    node = flow.nodes[row]
    if node.kind == "experts":
        outside = node.inputs - replicated
        if outside:
            return None, f"{row} reads {', '.join(sorted(outside))}, which are not replicated"
        return Unit(row, ()), ""
    if flow.reads_stream(row):
        return None, f"{row} reads the residual stream and other linears' outputs together"
    columns = _sources(flow, row) - {p for p in kept}
    if not columns:
        return None, f"{row} reads no linear that could be column-parallel"
    for col in sorted(columns):
        if flow.nodes[col].kind != "linear":
            return None, f"{row} reads {col}, which is not a linear"
        outside = flow.nodes[col].inputs - replicated
        if outside:
            return None, f"{col} reads {', '.join(sorted(outside))}, which would be sharded"
        if col in flow.feeds_stream or flow.readers(col) != {row}:
            return None, f"{col} feeds more than {row}"
    splits = {c: flow.nodes[c].split for c in columns if flow.nodes[c].split}
    return Unit(row, tuple(sorted(columns)), splits), ""


def _grad_sums(flow: BlockFlow, unit: Unit, planned: set[str]) -> tuple[str, ...]:
    """Parameters, outside the planned linears, that meet this unit's column-parallel outputs."""
    def owned(param: str) -> bool:
        return any(param.startswith(p + ".") for p in planned)

    sharded = set(unit.columns) if unit.columns else set()
    return tuple(sorted(p for p, met in flow.params_met.items() if met & sharded and not owned(p)))
