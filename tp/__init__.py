"""tp: tensor parallelism for any PyTorch model, in one call, on torch's DTensor machinery."""

from . import checkpoint, random  # noqa: F401  (tp.checkpoint.dcp, tp.random.seed / check_in_sync)
from .apply import apply
from .checkpoint import dcp, from_pretrained, load, save_pretrained
from .errors import (
    AlreadyShardedError,
    CheckpointError,
    MeshError,
    PlanError,
    RegistryError,
    SizeError,
    TPError,
)
from .plan.registry import load_registry
from .resolve import resolve
from .sharding.gather import full_state_dict, full_tensor
from .styles import Style
from .testing.verify import VerifyResult, verify

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
    "Style",
    "apply",
    "dcp",
    "full_state_dict",
    "full_tensor",
    "load_registry",
    "random",
    "resolve",
    "verify",
]
