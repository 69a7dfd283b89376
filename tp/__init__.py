"""tp: tensor parallelism for any PyTorch model, in one call, on torch's DTensor machinery.

The public names load on first use (PEP 562), so that ``import tp`` and ``tp --help`` do not
import torch and transformers before they are needed.
"""

from importlib import import_module

from .errors import (
    AlreadyShardedError,
    CheckpointError,
    MeshError,
    PlanError,
    RegistryError,
    SizeError,
    TPError,
)

# public name -> the module that defines it ("" for a submodule of that name)
_LAZY = {
    "apply": "tp.parallelize",
    "resolve": "tp.resolution",
    "from_pretrained": "tp.checkpoint",
    "load": "tp.checkpoint",
    "save_pretrained": "tp.checkpoint",
    "dcp": "tp.checkpoint",
    "checkpoint": "",
    "random": "",
    "full_state_dict": "tp.sharding.gather",
    "full_tensor": "tp.sharding.gather",
    "full_parameters": "tp.sharding.gather",
    "load_registry": "tp.plan.registry",
    "Style": "tp.styles",
    "VerifyResult": "tp.testing.verify",
    "verify": "tp.testing.verify",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'tp' has no attribute {name!r}")
    value = import_module(f"tp.{name}") if not _LAZY[name] else getattr(import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "AlreadyShardedError",
    "CheckpointError",
    "MeshError",
    "PlanError",
    "RegistryError",
    "SizeError",
    "TPError",
    *_LAZY,
]
