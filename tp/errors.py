"""Errors raised by tp. Each message says what went wrong, where, and what to do."""


class TPError(Exception):
    """Base class for every error tp raises on bad input."""


class RegistryError(TPError):
    """A registry file (built-in or user) has an invalid entry."""


class PlanError(TPError):
    """A plan cannot be resolved: unknown family or style, pattern conflicts, strict-mode misses."""


class SizeError(TPError):
    """A module's size does not divide by the tensor-parallel size."""


class MeshError(TPError):
    """The device mesh does not fit what tp needs."""


class AlreadyShardedError(TPError):
    """tp.apply was called on a model that already holds DTensor parameters."""


class CheckpointError(TPError):
    """A checkpoint that cannot be loaded into the model (missing, extra, mis-shaped or unreadable
    tensors, a corrupt header or index, no such directory) or saved (called on only some ranks, a
    write that failed). Raised on every rank alike, so no rank goes on alone."""
