"""The files of a Hugging Face safetensors checkpoint, checked before a byte of tensor data is read.

A safetensors file is an 8-byte little-endian header length, a JSON header that maps each
tensor name to its dtype, shape and byte range, then the data. A header is validated as the
safetensors library validates it (a sane length, a JSON object, a known dtype, a shape and
in-bounds, ordered, non-overlapping byte ranges of exactly ``prod(shape) x dtype size`` bytes),
so a corrupt file is one ``CheckpointError`` naming the file and the tensor, never a tensor
read from the wrong bytes. An index file is validated the same way.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
from pathlib import Path

import torch

from ..errors import CheckpointError
from .atomic import previous_versions

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# the safetensors library refuses headers over 100 MB: a larger length is a corrupt file
MAX_HEADER_BYTES = 100_000_000

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool}


def existing_directory(directory: str | os.PathLike) -> Path:
    """``directory`` as a Path, or the error that says it is not there (not a hub repo-id message)."""
    path = Path(directory)
    if not path.exists():
        raise CheckpointError(f"no such directory: {path}{_interrupted_save_hint(path)}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; a checkpoint is a directory (as save_pretrained writes)")
    return path


def _interrupted_save_hint(path: Path) -> str:
    previous = previous_versions(path)
    if not previous:
        return ""
    return (f"; an interrupted save left the previous checkpoint at {previous[0]}: rename it to {path.name} "
            "to use it")


def checkpoint_files(directory: str | os.PathLike) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (single file or indexed shards)."""
    directory = existing_directory(directory)
    index, single = directory / INDEX_FILE, directory / SINGLE_FILE
    if index.is_file() and single.is_file():
        # transformers loads the single file, an index-first reader the shards: refuse, never guess
        raise CheckpointError(f"{directory} holds both {SINGLE_FILE} and {INDEX_FILE}, one of them stale from an "
                              "earlier save; remove the stale one (or save again with tp.save_pretrained)")
    if index.is_file():
        return {name: directory / file for name, file in weight_map(index).items()}
    if single.is_file():
        with opened(single) as f:
            return dict.fromkeys(f.keys(), single)
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} nor {INDEX_FILE}; tp loads safetensors checkpoints "
                          "(save one with save_pretrained(..., safe_serialization=True))")


def weight_map(index: Path) -> dict[str, str]:
    """The index's tensor name -> file name map, each entry checked."""
    try:
        content = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {index}: {e}") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{index} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                              "the index is corrupt: save the checkpoint again") from e
    mapping = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(mapping, dict):
        raise CheckpointError(f"{index} has no \"weight_map\" object (tensor name -> file name); the index is "
                              "corrupt: save the checkpoint again")
    for name, file in mapping.items():
        if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
            raise CheckpointError(f"{index}: tensor {name} maps to {file!r}, not a file name in the checkpoint's "
                                  "directory; the index is corrupt")
    return mapping


class SafetensorsFile:
    """A safetensors file read with ``os.pread`` into fresh tensors, never memory-mapped.

    A memory map (``safe_open``) makes the pages a rank touches part of its RSS, and the slice
    of a column-sharded weight touches nearly every page of the tensor; reading only this
    rank's byte ranges keeps its memory at its own rows. The header is validated on opening.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"cannot read {path}: {e.strerror}") from e
        try:
            self.header, self.base = read_header(path, self.fd)
        except BaseException:
            os.close(self.fd)
            raise

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.header[name]["dtype"]]

    def read(self, name: str, dim: int | None, rows: list[int] | None) -> torch.Tensor:
        """The tensor, or only ``rows`` along ``dim``, one contiguous run of bytes at a time."""
        shape, dtype = list(self.shape(name)), self.dtype(name)
        start = self.base + self.header[name]["data_offsets"][0]
        if not shape:  # a scalar: read as one element
            return self._read_rows(name, [1], dtype, start, 0, [0]).reshape(())
        if dim is None:
            dim, rows = 0, list(range(shape[0]))
        return self._read_rows(name, shape, dtype, start, dim, rows)

    def _read_rows(self, name: str, shape: list[int], dtype: torch.dtype, start: int, dim: int,
                   rows: list[int]) -> torch.Tensor:
        outer = math.prod(shape[:dim])
        inner = math.prod(shape[dim + 1:]) * torch.empty((), dtype=dtype).element_size()
        out = torch.empty(shape[:dim] + [len(rows)] + shape[dim + 1:], dtype=dtype)
        buffer = memoryview(out.view(torch.uint8).numpy()).cast("B") if out.numel() else memoryview(b"")
        position, runs = 0, _runs(rows)
        for o in range(outer):
            for first, end in runs:
                size = (end - first) * inner
                try:
                    got = os.preadv(self.fd, [buffer[position:position + size]],
                                    start + (o * shape[dim] + first) * inner)
                except OSError as e:
                    raise CheckpointError(f"cannot read tensor {name} from {self.path}: {e.strerror}") from e
                if got != size:  # the file shrank after its header was checked
                    raise CheckpointError(f"cannot read {self.path}: the file ends inside tensor {name} "
                                          "(truncated?)")
                position += size
        return out

    def close(self) -> None:
        os.close(self.fd)


@contextlib.contextmanager
def opened(path: Path):
    f = SafetensorsFile(path)
    try:
        yield f
    finally:
        f.close()


def read_header(path: Path, fd: int) -> tuple[dict[str, dict], int]:
    """(tensor name -> entry, offset of the data) of an open safetensors file, validated."""
    size = os.fstat(fd).st_size
    if size < 8:
        raise CheckpointError(f"cannot read {path}: {size} bytes, too short for a safetensors file (truncated?)")
    (length,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    if length > min(MAX_HEADER_BYTES, size - 8):
        raise CheckpointError(f"cannot read {path}: its header length {length} is larger than "
                              f"{'the file' if length <= MAX_HEADER_BYTES else 'safetensors allows (100 MB)'}; "
                              "truncated, or not a safetensors file?")
    try:
        header = json.loads(os.pread(fd, length, 8))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: its header is not JSON ({e}); not a safetensors file?") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"cannot read {path}: its header is a JSON {type(header).__name__}, not an object "
                              "of tensor entries; not a safetensors file?")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise CheckpointError(f"cannot read {path}: its __metadata__ is not an object")
    _check_entries(path, header, data_bytes=size - 8 - length)
    return header, 8 + length


def _check_entries(path: Path, header: dict, data_bytes: int) -> None:
    """Every entry well formed; the byte ranges, in order, in bounds and not overlapping."""
    for name, entry in header.items():
        _check_entry(path, name, entry)
    end = 0
    previous = None
    for name, entry in sorted(header.items(), key=lambda item: tuple(item[1]["data_offsets"])):
        begin, stop = entry["data_offsets"]
        if begin < end:
            raise CheckpointError(f"cannot read {path}: tensor {name}'s bytes [{begin}, {stop}) overlap tensor "
                                  f"{previous}'s; the file is corrupt")
        end, previous = stop, name
        if stop > data_bytes:
            raise CheckpointError(f"cannot read {path}: the file ends inside tensor {name} (its bytes end at "
                                  f"{stop}, the data at {data_bytes}; truncated?)")


def _check_entry(path: Path, name: str, entry) -> None:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"cannot read {path}: tensor {name}: {what}; the file is corrupt: save or download it again")

    if not isinstance(entry, dict):
        raise bad(f"its entry is {type(entry).__name__}, not an object with dtype, shape and data_offsets")
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if code not in DTYPES:
        raise bad(f"dtype {code!r} is not one tp reads ({', '.join(DTYPES)})" if code is not None else "no dtype")
    if not _is_int_list(shape) or any(n < 0 for n in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative sizes" if shape is not None else "no shape")
    if not _is_int_list(offsets) or len(offsets) != 2:
        raise bad(f"data_offsets {offsets!r} is not [begin, end]" if offsets is not None else "no data_offsets")
    begin, stop = offsets
    if begin < 0 or stop < begin:
        raise bad(f"data_offsets {offsets} are negative or reversed")
    expected = math.prod(shape) * torch.empty((), dtype=DTYPES[code]).element_size()
    if stop - begin != expected:
        raise bad(f"data_offsets {offsets} span {stop - begin} bytes, but shape {shape} of {code} takes {expected}")


def _is_int_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in value)


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs ``[first, end)`` of sorted row indices."""
    runs, start = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[i - 1] + 1:
            runs.append((rows[start], rows[i - 1] + 1))
            start = i
    return runs


WEIGHTS_FILE = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")


def is_weights_file(name: str) -> bool:
    """A file of a Hugging Face checkpoint's weights (single, shard or index), which a new save replaces."""
    return WEIGHTS_FILE.match(name) is not None
