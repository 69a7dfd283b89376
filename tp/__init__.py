"""tp: tensor parallelism for any PyTorch model, in one call, on torch's DTensor machinery."""

from .apply import apply, resolve
from .errors import AlreadyShardedError, MeshError, PlanError, RegistryError, SizeError, TPError
from .registry import load_registry
from .verification import VerifyResult, verify

__all__ = [
    "apply",
    "resolve",
    "verify",
    "VerifyResult",
    "load_registry",
    "TPError",
    "PlanError",
    "RegistryError",
    "SizeError",
    "MeshError",
    "AlreadyShardedError",
]
