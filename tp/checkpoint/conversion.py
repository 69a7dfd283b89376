"""Checkpoint tensor names that transformers converts on load (per-expert MoE weights), read into shards.

transformers 5 holds each MoE layer's experts packed in two 3-D parameters (``gate_up_proj``,
``down_proj``), while Mixtral, Qwen-MoE, OLMoE and DeepSeek checkpoints hold one tensor per
expert (``experts.0.w1.weight``, ...). transformers converts them on load with rules per family
(``transformers.conversion_mapping``: renamings, and converters whose operations stack the
experts and concatenate gate and up) and reverts them on save. tp reads checkpoints with the
same rules, so a family that transformers converts needs no rule of tp's:

- names (``sources``): every checkpoint tensor is renamed as transformers renames it, which
  says which parameter it feeds, and in which order (transformers' natural order of names);
- rows (``read_converted``): for a parameter this rank holds only some rows of, the converter's
  own operations run once on small index tensors (one code per row of each checkpoint tensor
  along one dimension, size 1 along the others). Their result says which rows of which
  checkpoint tensor land in this rank's rows. The rank reads only those rows. That is exact when
  slicing commutes with the operations (stacking, concatenating, transposing), which a second
  index run checks; a converter that does not commute is run on the whole tensors, then sliced
  (correct, with more memory for that parameter).
- places: when index runs along the other dimensions show that the converter moves every
  checkpoint row whole (as stacking experts and concatenating gate and up do), each row is
  read straight into its place in the rank's parameter, with no copy of the parameter in
  between (stacking, then concatenating, would hold it three times at the peak); otherwise the
  converter runs on the rows read.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CheckpointError
from .files import SafetensorsFile


@dataclass(frozen=True)
class Source:
    """Where one parameter is in the checkpoint: one tensor under ``keys[0]`` as it is
    (``converter`` None), or the tensors ``keys`` that transformers' ``converter`` turns into it
    (``patterns``: the converter's source pattern each key matched)."""

    keys: tuple[str, ...]
    patterns: tuple[str | None, ...] = (None,)
    converter: object = None


@dataclass(frozen=True)
class CheckpointNames:
    """The checkpoint's tensors as the model sees them: ``found`` (model name -> its ``Source``),
    ``extra`` (checkpoint names that feed no name of the model) and ``used`` (transformers'
    transforms that renamed or converted a tensor: what ``save_pretrained`` reverts, so that the
    model saves in the layout it was loaded from, as transformers does)."""

    found: dict[str, Source]
    extra: list[str]
    used: list


def sources(model: nn.Module, names: Iterable[str], known: Iterable[str]) -> CheckpointNames:
    """The checkpoint ``names`` renamed as transformers' ``from_pretrained`` of ``model`` renames them,
    for a model whose state dict holds ``known``."""
    from transformers.core_model_loading import dot_natural_key, rename_source_key

    renamings, converters = _transforms(model)
    in_model = dict.fromkeys(known, True)  # transformers asks `.get(name) is not None`
    prefix = getattr(model, "base_model_prefix", None) or None
    converter_of = {pattern: c for c in converters for pattern in c.source_patterns}
    gathered: dict[str, list[tuple[str, str | None]]] = {}
    extra = []
    for key in sorted(names, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters, prefix, in_model)
        if target not in in_model and key in in_model:  # as transformers: a name the model has is kept
            target, pattern = key, None
        if target not in in_model:
            extra.append(key)
            continue
        gathered.setdefault(target, []).append((key, pattern))
    found = {}
    for target, feeding in gathered.items():
        keys, patterns = tuple(k for k, _ in feeding), tuple(p for _, p in feeding)
        if patterns[0] is None:
            if len(keys) > 1:
                raise CheckpointError(f"the checkpoint holds {len(keys)} tensors for {target}: {', '.join(keys)}; "
                                      "keep one of them")
            found[target] = Source(keys)
        else:
            found[target] = Source(keys, patterns, converter_of[patterns[0]])
    return CheckpointNames(found, extra, [t for t in renamings + converters if t.was_used()])


def _transforms(model: nn.Module) -> tuple[list, list]:
    """transformers' (renamings, converters) for loading ``model``; none for a model not of transformers."""
    from transformers import PreTrainedModel
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    if not isinstance(model, PreTrainedModel):
        return [], []
    transforms = get_model_conversion_mapping(model)
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])


Reader = Callable[[str], SafetensorsFile]  # checkpoint name -> the open file holding it


def read_converted(open_file: Reader, target: str, source: Source, model: nn.Module, dtype: torch.dtype,
                   global_shape: tuple[int, ...], dim: int | None, rows: list[int] | None) -> torch.Tensor:
    """This rank's rows (``rows`` along ``dim``; everything when ``dim`` is None) of the parameter
    ``target`` that transformers' converter makes from ``source.keys``, read row by row where the
    converter allows it (module docstring)."""
    shapes = [open_file(key).shape(key) for key in source.keys]

    def convert(tensors: list[torch.Tensor]) -> torch.Tensor:
        return _convert(source, target, tensors, model)

    def read(key: str, along: int | None, wanted: list[int] | None) -> torch.Tensor:
        return open_file(key).read(key, along, wanted).to(dtype)

    if dim is None:  # the whole parameter: all its rows along dimension 0
        dim, rows = 0, list(range(global_shape[0]))
    plan = _rows_per_source(convert, shapes, global_shape, dim, rows)
    expected = list(global_shape)
    expected[dim] = len(rows)
    placement = None if plan is None else _placement(convert, shapes, plan, expected)
    if placement is not None:
        # each checkpoint row read once, straight into its place: no copy of the parameter in between
        local = torch.empty(expected, dtype=dtype)
        view = local.permute(placement[0])
        for key, rows_of_key, (where, order) in zip(source.keys, plan.rows, _positions(plan, placement)):
            view[where] = read(key, plan.dim, rows_of_key).movedim(plan.dim, 0)[order]
    elif plan is not None:
        local = convert([read(key, plan.dim, r) for key, r in zip(source.keys, plan.rows)])
    else:
        local = convert([read(key, None, None) for key in source.keys])
        if tuple(local.shape) != tuple(global_shape):
            raise CheckpointError(f"{open_file(source.keys[0]).path}: {', '.join(source.keys[:2])}... convert into "
                                  f"{target} of shape {list(local.shape)}, but the model's is {list(global_shape)}; "
                                  "the checkpoint is for another configuration")
        local = local.index_select(dim, torch.tensor(rows, dtype=torch.long)).contiguous()
    if list(local.shape) != expected:
        raise CheckpointError(f"{open_file(source.keys[0]).path}: {source.keys[0]} and the other {len(source.keys) - 1} "
                              f"tensor(s) of {target} convert into rows of shape {list(local.shape)}, but this "
                              f"rank holds {expected}; the checkpoint is for another configuration")
    return local


def _convert(source: Source, target: str, tensors: list[torch.Tensor], model: nn.Module) -> torch.Tensor:
    """transformers' converter run on ``tensors`` (one per key of ``source``, in its order)."""
    converter = copy.deepcopy(source.converter)  # it collects tensors: a fresh one per call, as transformers does
    for key, pattern, tensor in zip(source.keys, source.patterns, tensors):
        converter.add_tensor(target, key, pattern, tensor)
    converted = converter.convert(target, model=model, config=getattr(model, "config", None))
    if len(converted) != 1:
        raise CheckpointError(f"transformers converts {source.keys[0]} into {len(converted)} tensors "
                              f"({', '.join(converted)}); tp reads converters into one parameter only, not yet "
                              "one into many")
    return next(iter(converted.values()))


@dataclass(frozen=True)
class RowPlan:
    """Converting rows ``rows[k]`` along dimension ``dim`` of each checkpoint tensor ``k`` gives this
    rank's rows of the parameter; ``codes`` says where each lands: at each position of the rank's
    rows (size 1 along the dimensions that the checkpoint rows fill), ``k * width + row``."""

    dim: int
    rows: list[list[int]]
    codes: torch.Tensor
    width: int


def _rows_per_source(convert, shapes: list[tuple[int, ...]], global_shape: tuple[int, ...], dim: int,
                     rows: list[int]) -> RowPlan | None:
    """Which rows of which checkpoint tensor make this rank's ``rows`` of the parameter along
    ``dim``; None when slicing along no dimension commutes with the converter."""
    ndims = {len(shape) for shape in shapes}
    if len(ndims) != 1:
        return None
    wanted_rows = torch.tensor(rows, dtype=torch.long)
    for j in range(ndims.pop()):
        width = max(shape[j] for shape in shapes)
        codes = [k * width + torch.arange(shape[j]).reshape([-1 if i == j else 1 for i in range(len(shape))])
                 for k, shape in enumerate(shapes)]
        whole = _converted_or_none(convert, codes)
        if whole is None or whole.dim() != len(global_shape) or whole.shape[dim] != global_shape[dim]:
            continue
        wanted = whole.index_select(dim, wanted_rows)
        present = wanted.unique()
        per_source = [(present[present // width == k] % width).tolist() for k in range(len(shapes))]
        sliced = _converted_or_none(convert, [c.index_select(j, torch.tensor(r, dtype=torch.long))
                                              for c, r in zip(codes, per_source)])
        if sliced is not None and sliced.shape == wanted.shape and torch.equal(sliced, wanted):
            return RowPlan(j, per_source, wanted, width)
    return None


def _placement(convert, shapes: list[tuple[int, ...]], plan: RowPlan,
               local_shape: list[int]) -> tuple[list[int], int] | None:
    """(a permutation of the local parameter's dimensions, how many lead) that puts first those the
    row codes index and last, in order, the checkpoint tensors' other dimensions, when the converter moves each
    checkpoint row whole (each of those dimensions lands intact on one of the parameter's); None
    when it does not, or this cannot be told."""
    codes = plan.codes
    lead = [d for d in range(codes.dim()) if codes.shape[d] != 1 or local_shape[d] == 1]
    rest = [d for d in range(codes.dim()) if d not in lead]
    others = [c for c in range(len(shapes[0])) if c != plan.dim]
    if not lead or len(rest) != len(others) or any(local_shape[d] != shapes[0][c] for d, c in zip(rest, others)) or \
            any(tuple(shape) != tuple(shapes[0]) for shape in shapes):
        return None
    for d, c in zip(rest, others):  # dimension c of every checkpoint tensor must land, in order, on d
        size = shapes[0][c]
        probe = [torch.arange(size).reshape([-1 if i == c else 1 for i in range(len(shape))]) for shape in shapes]
        landed = _converted_or_none(convert, probe)
        if landed is None or landed.dim() != len(local_shape) or landed.shape[d] != size:
            return None
        rows_of_it = landed.movedim(d, -1).reshape(-1, size)
        if not torch.equal(rows_of_it, torch.arange(size).expand_as(rows_of_it)):
            return None
    return lead + rest, len(lead)


def _positions(plan: RowPlan, placement: tuple[list[int], int]) -> list[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    """For each checkpoint tensor: (indices along the leading dimensions of the local parameter
    permuted by ``placement``, index among the rows read) of each of its rows that lands here."""
    order, lead = placement
    codes = plan.codes.permute(order)
    codes = codes.reshape(codes.shape[:lead])  # the other dimensions have size 1
    found = []
    for k, rows in enumerate(plan.rows):
        mine = (codes // plan.width) == k
        order = torch.searchsorted(torch.tensor(rows, dtype=torch.long), codes[mine] % plan.width)
        found.append((mine.nonzero(as_tuple=True), order))
    return found


def _converted_or_none(convert, codes: list[torch.Tensor]) -> torch.Tensor | None:
    """The converter's result on index tensors; None when its operations cannot take them (a
    reshape by head counts, a chunk of a dimension of size 1): not the dimension to slice."""
    try:
        return convert(codes)
    except Exception:  # noqa: BLE001 - whatever the operation raises, this dimension is not sliceable
        return None
