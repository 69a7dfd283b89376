"""A Hugging Face checkpoint through a sharded model, for tests that loading, decoding and saving
back are exact: the unsharded reference, a rank function for a pool, and the file comparison.

Example::
    >>> reference = save_and_decode(tiny_model("llama"), IDS, tmp_path / "ckpt")
    >>> ranks = pool.run(load_decode_save, str(tmp_path / "ckpt"), str(tmp_path / "saved"), IDS)
    >>> all(torch.equal(rank["tokens"], reference["tokens"]) for rank in ranks)
    True
    >>> differing_tensors(tmp_path / "ckpt", tmp_path / "saved")
    []
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

NEW_TOKENS = 6


def _decode(model: nn.Module, ids: torch.Tensor) -> dict:
    with torch.no_grad():
        return {"logits": model(input_ids=ids).logits,
                "tokens": model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)}


def save_and_decode(model: nn.Module, ids: torch.Tensor, directory: str | os.PathLike) -> dict:
    """Save the unsharded ``model`` with ``save_pretrained``; its logits of ``ids`` and greedy tokens."""
    model.eval().save_pretrained(directory)
    return _decode(model, ids)


def load_decode_save(checkpoint: str, out: str, ids: torch.Tensor,
                     inspect: Callable[[nn.Module], Any] | None = None) -> dict:
    """On every rank: ``tp.from_pretrained`` over all ranks, the logits of ``ids`` and greedy tokens,
    ``tp.save_pretrained`` to ``out``; with ``inspect``, what it tells of the sharded model too."""
    import tp

    model = tp.from_pretrained(checkpoint, init_device_mesh("cpu", (dist.get_world_size(),)))
    found = _decode(model, ids)
    tp.save_pretrained(model, out)
    return {**found, "inspected": inspect(model) if inspect else None}


def differing_tensors(first: str | os.PathLike, second: str | os.PathLike) -> list[str]:
    """The tensor names of two single-file checkpoints that one lacks or whose values differ."""
    from safetensors.torch import load_file

    a, b = (load_file(Path(d) / "model.safetensors") for d in (first, second))
    return sorted(set(a) ^ set(b)) + [name for name in a if name in b and not torch.equal(a[name], b[name])]
