"""Counting collectives with torch's CommDebugMode, over the whole model only."""

from __future__ import annotations

from collections import Counter

from torch.distributed.tensor.debug import CommDebugMode


class _WholeModelTracker:
    """Stands in for CommDebugMode's per-module tracker. That tracker breaks when one module
    runs twice in a forward (Phi calls its resid_dropout after attention and after the MLP),
    and tp only needs totals."""

    name = "Global"
    is_bw = False
    activation_checkpointing = False
    module_parents_dict = {"Global": set()}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


class CollectiveCounter(CommDebugMode):
    """CommDebugMode that counts collectives for the whole model, with short names.

    Example::
        >>> with CollectiveCounter() as counter:
        ...     model(ids)
        >>> counter.counts()
        Counter({'all_reduce': 5, 'all_gather': 1})
    """

    def __init__(self):
        super().__init__()
        self.advanced_module_tracker = _WholeModelTracker()

    def counts(self) -> Counter:
        counts = Counter()
        for op, n in self.get_comm_counts().items():
            counts[short_name(op)] += n
        return counts


# c10d's in-place ops (dist.all_reduce) and the functional ones name the same collective differently.
_C10D_NAMES = {"allreduce_": "all_reduce", "allgather_": "all_gather", "reduce_scatter_": "reduce_scatter",
               "broadcast_": "broadcast"}


def short_name(op) -> str:
    name = str(op).split(".")[-1].removesuffix("_into_tensor").removesuffix("_tensor")
    return _C10D_NAMES.get(name, name)
