"""Load a Hugging Face safetensors checkpoint straight into a sharded model, and save one back.

``from_pretrained`` builds the model with its parameters on the meta device (no memory),
shards it with ``tp.apply``, then ``load`` reads for every parameter only the rows this rank
holds (its byte ranges of the safetensors files, read with ``os.pread``, after their headers
are validated in ``files.py``), whatever the layout: contiguous shards, strided parts (fused
qkv, packed gate_up, Yuan's v/o halves), replicated kv heads, tied embeddings, and tensors
that transformers renames or converts on load, such as Mixtral's per-expert weights packed
into the experts' 3-D parameters (``conversion.py``). A rank never holds more than its shards,
and every rank gets the same outcome (``ranks.py``).
``save_pretrained`` gathers the parameters one by one and writes an ordinary Hugging Face
checkpoint from rank 0, swapped in whole (``atomic.py``), in the layout of the checkpoint the
model was loaded from, as transformers saves (per-expert names where it writes them).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..errors import CheckpointError
from ..parallelize import apply
from ..sharding.gather import full_state_dict
from ..sharding.tags import copy_tags, fused_in_parts
from ..sharding.ties import retie, tied_groups
from .atomic import save_directory
from .conversion import Reader, Source, read_converted, sources
from .files import (
    DTYPES,
    INDEX_FILE,
    SINGLE_FILE,
    SafetensorsFile,
    checkpoint_files,
    existing_directory,
    is_weights_file,
    opened,
)
from .ranks import ENTRY_TIMEOUT_S, agree, one_line, world

__all__ = ["DTYPES", "INDEX_FILE", "SINGLE_FILE", "SafetensorsFile", "checkpoint_files", "from_pretrained", "load",
           "parameters_on_meta", "progress_reporter", "save_pretrained"]


@contextlib.contextmanager
def parameters_on_meta():
    """Create modules with their parameters on the meta device and their buffers real (rotary
    frequencies and other buffers a checkpoint does not hold are computed as usual)."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


@dataclass(frozen=True)
class _Target:
    """One tensor of the unsharded model to fill: a parameter, or a fused one stored in parts."""

    name: str
    stored: tuple[tuple[str, torch.Tensor], ...]  # (full name, parameter): the parts in order, or itself
    dim: int = 0  # the dimension the parts are joined along

    @property
    def dtype(self) -> torch.dtype:
        return self.stored[0][1].dtype

    @property
    def global_shape(self) -> tuple[int, ...]:
        shape = list(self.stored[0][1].shape)
        if len(self.stored) > 1:
            shape[self.dim] = sum(param.shape[self.dim] for _, param in self.stored)
        return tuple(shape)

    def local_indices(self) -> tuple[int | None, list[int] | None]:
        """(dimension, indices along it) of the rows this rank holds, in the order its parameters
        hold them; (None, None) for a whole tensor."""
        if len(self.stored) == 1:
            return _local_indices(self.stored[0][1])
        rows, start = [], 0
        for _, part in self.stored:
            dim, own = _local_indices(part)
            rows.extend(start + row for row in (own if dim is not None else range(part.shape[self.dim])))
            start += part.shape[self.dim]
        return self.dim, rows

    def local_sizes(self) -> list[int]:
        return [(part.to_local() if isinstance(part, DTensor) else part).shape[self.dim] for _, part in self.stored]


def _targets(model: nn.Module, params: list[tuple[str, torch.Tensor]]) -> list[_Target]:
    """The tensors of the unsharded model that ``params`` store, each once."""
    by_name = dict(params)
    stored_in = {}
    for name, (parts, dim) in fused_in_parts(model).items():
        if parts[0] in by_name:
            stored_in.update({part: (name, parts, dim) for part in parts})
    targets, done = [], set()
    for name, param in params:
        if name not in stored_in:
            targets.append(_Target(name, ((name, param),)))
        elif name not in done:
            fused, parts, dim = stored_in[name]
            done.update(parts)
            targets.append(_Target(fused, tuple((part, by_name[part]) for part in parts), dim))
    return targets


def _local_indices(param: torch.Tensor) -> tuple[int | None, list[int] | None]:
    """(dimension, indices along it) of the rows a parameter holds on this rank; (None, None) for a whole one."""
    if isinstance(param, DTensor):
        (placement,) = param.placements
        if isinstance(placement, Replicate):
            return None, None
        mesh, dim = param.device_mesh, placement.dim % param.dim()
        # the same placement on the rows' index vector tells which rows this rank holds
        chunks, _ = Shard(0)._split_tensor(torch.arange(param.shape[dim]), mesh.size(), with_padding=False)
        return dim, chunks[mesh.get_local_rank()].tolist()
    return None, None


def progress_reporter(enabled: bool | None):
    import torch.distributed as dist

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    show = rank0 and (sys.stderr.isatty() if enabled is None else enabled)

    def update(done: int, total: int, name: str) -> None:
        if show:
            end = "\n" if done == total else ""
            print(f"\rtp: loading {done}/{total} tensors ({name})\x1b[K", end=end, file=sys.stderr, flush=True)

    return update


def load(model: nn.Module, checkpoint_dir: str | os.PathLike, *, strict: bool = True,
         progress: bool | None = None) -> None:
    """Fill a model sharded by ``tp.apply`` (parameters on the meta device or not) from a
    safetensors checkpoint, reading on each rank only its own rows.

    Every parameter must be in the checkpoint with its unsharded shape (tied parameters once);
    a tensor in the checkpoint that the model lacks is an error too (``strict=False``: a
    warning). Any failure is one ``CheckpointError`` naming the tensor and the file, raised on
    every rank (the ranks agree on the outcome: a collective, call it on every rank) before any
    parameter is replaced. ``progress``: a progress line on rank 0 (default: when stderr is a terminal).
    """
    ties = tied_groups(model)
    tied_aliases = {f"{p}.{n}" if p else n for group in ties for p, n in group[1:]}
    params = [(name, p) for name, p in model.named_parameters(remove_duplicate=False) if name not in tied_aliases]
    targets = _targets(model, params)
    loaded, conversions = agree(lambda: _read_own_rows(model, targets, checkpoint_dir, strict, progress),
                                what=f"tp.load({checkpoint_dir})")
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):  # saved back in the checkpoint's layout, as after transformers' load
        model._weight_conversions = conversions
    for target in targets:
        # parts along dim 0 stay views of the rows read for them, which the module computes with uncopied
        # (tp/sharding/fused.py); FSDP2 takes only contiguous parameters
        locals_ = loaded.pop(target.name).split(target.local_sizes(), dim=target.dim)
        for (name, param), local in zip(target.stored, locals_, strict=True):
            module_path, _, attr = name.rpartition(".")
            model.get_submodule(module_path).register_parameter(attr, _materialize(param, local.contiguous()))
    retie(model, ties)


def _read_own_rows(model: nn.Module, targets: list[_Target], checkpoint_dir, strict: bool,
                   progress: bool | None) -> tuple[dict[str, torch.Tensor], list]:
    """(parameter name -> this rank's rows of it, transformers' conversions that renamed or converted
    checkpoint tensors), read from the checkpoint after checking its names, which are renamed and
    converted as transformers converts them on load (``conversion.py``)."""
    files = checkpoint_files(checkpoint_dir)
    parts = {name for target in targets if len(target.stored) > 1 for name, _ in target.stored}
    known = [name for name in model.state_dict() if name not in parts] + [t.name for t in targets if t.stored[0][0] in parts]
    names = sources(model, files, known=known)
    found = names.found
    _check_names(model, [target.name for target in targets], found, names.extra, files, checkpoint_dir, strict)
    handles: dict[Path, SafetensorsFile] = {}
    loaded: dict[str, torch.Tensor] = {}
    update = progress_reporter(progress)
    with contextlib.ExitStack() as stack:
        def open_file(key: str) -> SafetensorsFile:
            path = files[key]
            if path not in handles:
                try:
                    handles[path] = stack.enter_context(opened(path))
                except CheckpointError as e:
                    raise CheckpointError(f"{e}; it holds {key}") from e
            f = handles[path]
            if key not in f.header:
                raise CheckpointError(f"{f.path}: tensor {key} is not in the file its index names")
            return f

        for done, target in enumerate(targets, 1):
            loaded[target.name] = _read_parameter(open_file, target, found[target.name], model)
            update(done, len(targets), target.name)
    return loaded, names.used


def _check_names(model: nn.Module, needed: list[str], found: dict[str, Source], extra: list[str],
                 files: dict[str, Path], checkpoint_dir, strict: bool) -> None:
    """Every parameter in the checkpoint; no tensor in it that the model lacks (unless not ``strict``)."""
    missing = [name for name in needed if name not in found]
    if missing:
        raise CheckpointError(f"{checkpoint_dir}: the checkpoint lacks {len(missing)} tensor(s) the model needs: "
                              f"{_listed(missing)}; it was saved for another model or configuration")
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    extra = [name for name in extra if not any(p.search(name) for p in ignored)]
    if not extra:
        return
    message = (f"{checkpoint_dir}: the checkpoint holds {len(extra)} tensor(s) the model lacks: {_listed(extra)} "
               f"(in {files[extra[0]].name}); it was saved for another configuration than its config.json "
               "describes, or for another model")
    if strict:
        raise CheckpointError(f"{message}. Pass strict=False to load the rest and ignore them")
    if world()[0] == 0:
        warnings.warn(f"tp: {message}; ignored them (strict=False)", stacklevel=4)


def _listed(names: list[str]) -> str:
    return f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"


def _read_parameter(open_file: Reader, target: _Target, source: Source, model: nn.Module) -> torch.Tensor:
    """This rank's rows of ``target`` from the checkpoint tensor(s) that hold it, checked against
    the parameter(s) it fills."""
    name, dtype, global_shape = target.name, target.dtype, target.global_shape
    for key in source.keys:
        f = open_file(key)
        if dtype.is_floating_point and not f.dtype(key).is_floating_point:
            raise CheckpointError(f"{f.path}: tensor {key} is {f.dtype(key)}, which the model's {dtype} "
                                  "parameter cannot take")
    dim, rows = target.local_indices()
    if source.converter is not None:
        return read_converted(open_file, name, source, model, dtype, global_shape, dim, rows)
    (key,) = source.keys
    f = open_file(key)
    shape = f.shape(key)
    if shape != global_shape:
        raise CheckpointError(f"{f.path}: tensor {key} has shape {list(shape)}, but the model's is "
                              f"{list(global_shape)}; the checkpoint is for another configuration")
    return f.read(key, dim, rows).to(dtype)


def _materialize(param: torch.Tensor, local: torch.Tensor) -> nn.Parameter:
    if isinstance(param, DTensor):
        placed = DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                    shape=param.shape, stride=param.stride())
        new = nn.Parameter(placed, requires_grad=param.requires_grad)
        copy_tags(param, new)
        return new
    return nn.Parameter(local, requires_grad=param.requires_grad)


def from_pretrained(checkpoint_dir: str | os.PathLike, mesh, *, dtype: torch.dtype | None = None,
                    strict: bool = True, progress: bool | None = None, **apply_kwargs) -> nn.Module:
    """Build, shard and load a Hugging Face causal LM without ever holding it whole.

    ``dtype``: the parameters' dtype; by default the checkpoint's, as transformers 5 chooses
    it (``dtype``/``torch_dtype`` in config.json, else the first floating-point tensor's).

    Example::
        >>> mesh = init_device_mesh("cuda", (8,))
        >>> model = tp.from_pretrained("path/to/llama", mesh)   # bf16 if the checkpoint is
    """
    from transformers import AutoModelForCausalLM

    from .. import models  # noqa: F401  (registers Yuan with the Auto classes)

    config, dtype = agree(lambda: _config_and_dtype(checkpoint_dir, dtype), what=f"tp.from_pretrained({checkpoint_dir})")
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    apply(model, mesh, **apply_kwargs)
    load(model, checkpoint_dir, strict=strict, progress=progress)
    return model.eval()


def _config_and_dtype(checkpoint_dir, dtype: torch.dtype | None):
    from transformers import AutoConfig

    directory = existing_directory(checkpoint_dir)
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{directory}: cannot read its config.json: {one_line(e)}") from e
    return config, dtype or checkpoint_dtype(config, directory)


def checkpoint_dtype(config, directory: Path) -> torch.dtype:
    """The dtype transformers 5 gives a model loaded with ``dtype="auto"`` (its default)."""
    named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(named, torch.dtype):
        return named
    if isinstance(named, str) and named != "auto":
        if not isinstance(getattr(torch, named, None), torch.dtype):
            raise CheckpointError(f"{directory}/config.json: dtype {named!r} is not a torch dtype")
        return getattr(torch, named)
    files = checkpoint_files(directory)
    if not files:
        return torch.float32
    with opened(min(set(files.values()))) as f:
        dtypes = [f.dtype(name) for name in f.header]
    floating = [d for d in dtypes if d.is_floating_point and d.itemsize > 1]  # float8 cannot be a model's dtype
    return floating[0] if floating else dtypes[0] if dtypes else torch.float32


def save_pretrained(model: nn.Module, directory: str | os.PathLike, *, timeout: float = ENTRY_TIMEOUT_S,
                    **kwargs) -> None:
    """Write a sharded model as an ordinary Hugging Face checkpoint (un-permuted, unpacked).

    A collective: call it on every rank (a call on only some ranks is refused after ``timeout``
    seconds, not hung). Parameters are gathered one at a time; rank 0 writes them with the
    model's own ``save_pretrained`` (so it holds the whole state dict while writing) into a
    temporary directory beside ``directory``, then swaps it in whole (``tp/checkpoint/atomic.py``):
    a crash leaves the old checkpoint or the new one, never a mix. Files in ``directory`` other
    than an old checkpoint's weights (a tokenizer, a README) are kept.
    """
    rank0 = world()[0] == 0

    def write(temporary: Path) -> None:
        state = full_state_dict(model)
        if rank0:
            model.save_pretrained(temporary, state_dict=state, **kwargs)

    save_directory("tp.save_pretrained", directory, write, replaced=is_weights_file, timeout=timeout)
