"""tp: tensor parallelism for any PyTorch model, in one call, on torch's DTensor machinery."""

from .apply import apply, resolve
from .checkpoint import CheckpointError, from_pretrained, load, save_pretrained
from .errors import (
    AlreadyShardedError,
    MeshError,
    PlanError,
    RegistryError,
    SizeError,
    TPError,
)
from .gather import full_state_dict, full_tensor
from . import random  # noqa: F401  (tp.random.seed / check_in_sync)
from .registry import load_registry
from .verification import VerifyResult, verify

__all__ = [
    "CheckpointError",
    "from_pretrained",
    "load",
    "save_pretrained",
    "AlreadyShardedError",
    "MeshError",
    "PlanError",
    "RegistryError",
    "SizeError",
    "TPError",
    "VerifyResult",
    "apply",
    "full_state_dict",
    "full_tensor",
    "load_registry",
    "random",
    "resolve",
    "verify",
]
