"""tp: tensor parallelism for any PyTorch model, in one call, on torch's DTensor machinery."""

from .apply import apply, resolve
from .gather import full_state_dict, full_tensor
from .errors import AlreadyShardedError, MeshError, PlanError, RegistryError, SizeError, TPError
from .registry import load_registry
from .verification import VerifyResult, verify

__all__ = [
    "apply",
    "resolve",
    "verify",
    "full_tensor",
    "full_state_dict",
    "VerifyResult",
    "load_registry",
    "TPError",
    "PlanError",
    "RegistryError",
    "SizeError",
    "MeshError",
    "AlreadyShardedError",
]
