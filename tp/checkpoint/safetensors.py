"""Load a Hugging Face safetensors checkpoint straight into a sharded model, and save one back.

``from_pretrained`` builds the model with its parameters on the meta device (no memory),
shards it with ``tp.apply``, then ``load`` reads for every parameter only the rows this rank
holds (its byte ranges of the safetensors files, read with ``os.pread``), whatever the layout: contiguous shards, strided parts
(fused qkv, packed gate_up, Yuan's v/o halves), replicated kv heads, tied embeddings. A rank
never holds more than its shards. ``save_pretrained`` gathers the parameters one by one and
writes an ordinary Hugging Face checkpoint from rank 0.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import sys
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from ..apply import apply
from ..errors import CheckpointError
from ..sharding.gather import full_state_dict
from ..sharding.tags import copy_tags, local_shard_of, local_shard_parameter
from ..sharding.ties import retie, tied_groups

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


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


def checkpoint_files(directory: str | os.PathLike) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (single file or indexed shards)."""
    directory = Path(directory)
    if (directory / INDEX_FILE).is_file():
        weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    if (directory / SINGLE_FILE).is_file():
        with _opened(directory / SINGLE_FILE) as f:
            return dict.fromkeys(f.keys(), directory / SINGLE_FILE)
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} nor {INDEX_FILE}; tp loads safetensors checkpoints "
                          "(save one with save_pretrained(..., safe_serialization=True))")


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


class SafetensorsFile:
    """A safetensors file read with ``os.pread`` into fresh tensors, never memory-mapped.

    A memory map (``safe_open``) makes the pages a rank touches part of its RSS, and the slice
    of a column-sharded weight touches nearly every page of the tensor; reading only this
    rank's byte ranges keeps its memory at its own rows.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY)
            (length,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
            self.header = json.loads(os.pread(self.fd, length, 8))
        except (OSError, struct.error, ValueError) as e:
            raise CheckpointError(f"cannot read {path}: {e} (truncated, or not a safetensors file?)") from e
        self.header.pop("__metadata__", None)
        self.base = 8 + length

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self.header[name]["dtype"]
        if code not in DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name} has dtype {code}, which tp cannot read")
        return DTYPES[code]

    def read(self, name: str, dim: int | None, rows: list[int] | None) -> torch.Tensor:
        """The tensor, or only ``rows`` along ``dim``, one contiguous run of bytes at a time."""
        shape, dtype = list(self.shape(name)), self.dtype(name)
        start = self.base + self.header[name]["data_offsets"][0]
        if dim is None:
            dim, rows = 0, list(range(shape[0])) if shape else []
        if not shape:  # a scalar
            return self._bytes_to_tensor(start, torch.empty((), dtype=dtype), name)
        outer = math.prod(shape[:dim])
        inner = math.prod(shape[dim + 1:]) * torch.empty((), dtype=dtype).element_size()
        out = torch.empty(shape[:dim] + [len(rows)] + shape[dim + 1:], dtype=dtype)
        buffer = memoryview(out.view(torch.uint8).numpy()).cast("B") if out.numel() else memoryview(b"")
        position, runs = 0, _runs(rows)
        for o in range(outer):
            for first, end in runs:
                size = (end - first) * inner
                got = os.preadv(self.fd, [buffer[position:position + size]],
                                start + (o * shape[dim] + first) * inner)
                if got != size:
                    raise CheckpointError(f"cannot read {self.path}: the file ends inside tensor {name} "
                                          f"(truncated?); it holds {name}")
                position += size
        return out

    def _bytes_to_tensor(self, offset: int, out: torch.Tensor, name: str) -> torch.Tensor:
        data = os.pread(self.fd, out.element_size(), offset)
        if len(data) != out.element_size():
            raise CheckpointError(f"cannot read {self.path}: the file ends inside tensor {name} (truncated?)")
        return torch.frombuffer(bytearray(data), dtype=out.dtype).reshape(())

    def close(self) -> None:
        os.close(self.fd)


@contextlib.contextmanager
def _opened(path: Path):
    f = SafetensorsFile(path)
    try:
        yield f
    finally:
        f.close()


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs ``[first, end)`` of sorted row indices."""
    runs, start = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[i - 1] + 1:
            runs.append((rows[start], rows[i - 1] + 1))
            start = i
    return runs


def _local_indices(param: torch.Tensor) -> tuple[int | None, list[int] | None]:
    """(dimension, indices along it) of the rows this rank holds; (None, None) for a whole tensor."""
    shard = local_shard_of(param)
    if shard is not None:
        return shard.dim, shard.layout.rows(shard.mesh.size(), shard.mesh.get_local_rank())
    if isinstance(param, DTensor):
        (placement,) = param.placements
        if isinstance(placement, Replicate):
            return None, None
        mesh, dim = param.device_mesh, placement.dim % param.dim()
        # the same placement on the rows' index vector tells which rows this rank holds
        on_indices = (_StridedShard(0, split_factor=placement.split_factor) if isinstance(placement, _StridedShard)
                      else Shard(0))
        chunks, _ = on_indices._split_tensor(torch.arange(param.shape[dim]), mesh.size(), with_padding=False)
        return dim, chunks[mesh.get_local_rank()].tolist()
    return None, None


def _global_shape(param: torch.Tensor) -> tuple[int, ...]:
    shard = local_shard_of(param)
    shape = list(param.shape)
    if shard is not None:
        shape[shard.dim] = shard.layout.size
    return tuple(shape)


def progress_reporter(enabled: bool | None):
    import torch.distributed as dist

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    show = rank0 and (sys.stderr.isatty() if enabled is None else enabled)

    def update(done: int, total: int, name: str) -> None:
        if show:
            end = "\n" if done == total else ""
            print(f"\rtp: loading {done}/{total} tensors ({name})\x1b[K", end=end, file=sys.stderr, flush=True)

    return update


def load(model: nn.Module, checkpoint_dir: str | os.PathLike, *, progress: bool | None = None) -> None:
    """Fill a model sharded by ``tp.apply`` (parameters on the meta device or not) from a
    safetensors checkpoint, reading on each rank only its own rows.

    Every parameter must be in the checkpoint with its unsharded shape (tied parameters once);
    otherwise CheckpointError names the tensor and the file, before any parameter is replaced.
    ``progress``: a progress line on rank 0 (default: when stderr is a terminal).
    """
    files = checkpoint_files(checkpoint_dir)
    ties = tied_groups(model)
    tied_aliases = {f"{p}.{n}" if p else n for group in ties for p, n in group[1:]}
    params = [(name, p) for name, p in model.named_parameters(remove_duplicate=False) if name not in tied_aliases]
    missing = [name for name, _ in params if name not in files]
    if missing:
        raise CheckpointError(f"{checkpoint_dir}: the checkpoint lacks {len(missing)} tensor(s) the model needs: "
                              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    handles: dict[Path, object] = {}
    loaded: dict[str, torch.Tensor] = {}
    update = progress_reporter(progress)
    with contextlib.ExitStack() as stack:
        for done, (name, param) in enumerate(params, 1):
            path = files[name]
            if path not in handles:
                try:
                    handles[path] = stack.enter_context(_opened(path))
                except CheckpointError as e:
                    raise CheckpointError(f"{e}; it holds {name}") from e
            f = handles[path]
            if name not in f.header:
                raise CheckpointError(f"{path}: tensor {name} is not in the file its index names")
            shape = f.shape(name)
            if shape != _global_shape(param):
                raise CheckpointError(f"{path}: tensor {name} has shape {list(shape)}, but the model's is "
                                      f"{list(_global_shape(param))}; the checkpoint is for another configuration")
            dim, rows = _local_indices(param)
            local = f.read(name, dim, rows)
            if not (local.is_floating_point() or not param.is_floating_point()):
                raise CheckpointError(f"{path}: tensor {name} is {local.dtype}, which the model's {param.dtype} "
                                      "parameter cannot take")
            loaded[name] = local.to(param.dtype)
            update(done, len(params), name)
    for name, param in params:
        module_path, _, attr = name.rpartition(".")
        module = model.get_submodule(module_path)
        module.register_parameter(attr, _materialize(param, loaded.pop(name)))
    retie(model, ties)


def _materialize(param: torch.Tensor, local: torch.Tensor) -> nn.Parameter:
    shard = local_shard_of(param)
    if shard is not None:
        return local_shard_parameter(local, shard, requires_grad=param.requires_grad)
    if isinstance(param, DTensor):
        placed = DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                    shape=param.shape, stride=param.stride())
        new = nn.Parameter(placed, requires_grad=param.requires_grad)
        copy_tags(param, new)
        return new
    return nn.Parameter(local, requires_grad=param.requires_grad)


def from_pretrained(checkpoint_dir: str | os.PathLike, mesh, *, dtype: torch.dtype = torch.float32,
                    progress: bool | None = None, **apply_kwargs) -> nn.Module:
    """Build, shard and load a Hugging Face causal LM without ever holding it whole.

    Example::
        >>> mesh = init_device_mesh("cuda", (8,))
        >>> model = tp.from_pretrained("path/to/llama", mesh, dtype=torch.bfloat16)
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from .. import models  # noqa: F401  (registers Yuan with the Auto classes)

    config = AutoConfig.from_pretrained(checkpoint_dir, local_files_only=True)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    apply(model, mesh, **apply_kwargs)
    load(model, checkpoint_dir, progress=progress)
    return model.eval()


def save_pretrained(model: nn.Module, directory: str | os.PathLike, **kwargs) -> None:
    """Write a sharded model as an ordinary Hugging Face checkpoint (un-permuted, unpacked).

    A collective: call it on every rank. Parameters are gathered one at a time; rank 0 writes
    them with the model's own ``save_pretrained`` (so it holds the whole state dict while writing).
    """
    import torch.distributed as dist

    state = full_state_dict(model)
    if not dist.is_initialized() or dist.get_rank() == 0:
        model.save_pretrained(directory, state_dict=state, **kwargs)
    if dist.is_initialized():
        dist.barrier()
