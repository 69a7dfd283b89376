"""Checkpoints read straight into shards and written back: Hugging Face safetensors
(``safetensors.py``) and torch.distributed.checkpoint, which reshards (``dcp.py``)."""

from ..errors import CheckpointError
from . import dcp
from .safetensors import from_pretrained, load, save_pretrained

__all__ = ["CheckpointError", "dcp", "from_pretrained", "load", "save_pretrained"]
