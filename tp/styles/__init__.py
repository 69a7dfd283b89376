"""Styles: how one module is sharded, each declared by a ``Style`` descriptor (descriptor.py).

Built-in styles are torch's own ``ParallelStyle``s where torch has one (``ColwiseParallel``,
``RowwiseParallel``, ``SequenceParallel``) and small ones of ours elsewhere; ``table.py`` lists
them. A plan names a style by its name, optionally with keyword arguments::

    "model.layers.*.self_attn.q_proj" = "colwise"
    "lm_head" = { style = "lm_head", loss_parallel = true }
"""

from .descriptor import Act, Args, Site, Style
from .table import STYLES, StyleSpec, register

__all__ = ["Act", "Args", "STYLES", "Site", "Style", "StyleSpec", "register"]
