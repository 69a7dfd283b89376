"""The styles sequence parallelism adds: norms and dropout on sequence shards, and sync points."""

from __future__ import annotations

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import PrepareModuleOutput, SequenceParallel

from .descriptor import Act, Args, Style


class SequenceDimArgs(Args):
    sequence_dim: int = 1


SEQUENCE_PARALLEL = Style(
    name="sequence_parallel", build=lambda site: SequenceParallel(sequence_dim=site.args.sequence_dim),
    args=SequenceDimArgs, doc="norms and dropout on sequence shards (torch's SequenceParallel)",
    reads=Act.SEQUENCE, leaves=Act.SEQUENCE)

# A replicated output is cut locally; a partial one is reduce-scattered. Its gradient is all-gathered.
SEQUENCE_SHARD = Style(
    name="sequence_shard",
    build=lambda site: PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(
        site.args.sequence_dim), use_local_output=False),
    args=SequenceDimArgs, doc="a sync point after a module: its output leaves sharded along the sequence",
    reads=Act.REPLICATED, leaves=Act.SEQUENCE, collectives=lambda site: (0, 1))
