"""gathered_norm, shard_rows and rowwise_into_sharded, each against the unsharded modules,
forward and backward.

A column-parallel linear feeds a norm over all its output features (gathered_norm), an op that
reads one value per head (shard_rows), or a row-parallel linear whose all-reduced output scales
the sharded features again (rowwise_into_sharded, as Mamba's x_proj); then a row-parallel
linear. The same chain unsharded is the reference. float32, same seed; tolerances as everywhere: outputs 1e-5 absolute, gradients
1e-4 relative. CommDebugMode counts the gathered norm's collectives.
"""

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

from tp.sharding.gather import full_parameters
from tp.styles.gathered_norm import GatheredNorm
from tp.styles.linear import RowwiseIntoSharded
from tp.styles.shard_rows import ShardRows

WIDTH, HEADS = 16, 4


class NormChain(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.up, self.norm, self.down = nn.Linear(8, WIDTH), norm, nn.Linear(WIDTH, 8)

    def forward(self, x):
        return self.down(self.norm(self.up(x)))


class Sinks(nn.Module):
    """Heads of ``up``'s output, each shifted by its own learned value (as GPT-OSS's sinks)."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, WIDTH), nn.Linear(WIDTH, 8)
        self.sinks = nn.Parameter(torch.randn(HEADS))
        self.heads = HEADS

    def forward(self, x):
        h = self.up(x).unflatten(-1, (self.heads, -1)) + self.sinks[:, None]
        return self.down(h.flatten(-2))


class Gate(nn.Module):
    """``up``'s features scaled by a projection of themselves (Mamba's dt from x_proj)."""

    def __init__(self):
        super().__init__()
        self.up, self.reduce, self.down = nn.Linear(8, WIDTH), nn.Linear(WIDTH, 1), nn.Linear(WIDTH, 8)

    def forward(self, x):
        h = self.up(x)
        return self.down(h * torch.sigmoid(self.reduce(h)))


def _compare(ref: nn.Module, model: nn.Module) -> dict:
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1))
    ref(x).square().sum().backward()
    with CommDebugMode() as comm:
        out = model(x)
    forward = {str(k).split(".")[-1]: v for k, v in comm.get_comm_counts().items()}
    out.square().sum().backward()
    grads = {n: (g - dict(ref.named_parameters())[n].grad).abs().max().item()
             / dict(ref.named_parameters())[n].grad.abs().max().item() for n, g in full_parameters(model, grads=True).items()}
    return {"out": (out - ref(x)).abs().max().item(), "grads": grads, "forward": forward}


def _norm(kind: str) -> nn.Module:
    norm = nn.LayerNorm(WIDTH) if kind == "layer" else nn.RMSNorm(WIDTH)
    with torch.no_grad():  # not the default ones, so a gradient summed wrongly shows
        for p in norm.parameters():
            p.uniform_(0.5, 1.5)
    return norm


def _twins(build) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    ref = build()
    torch.manual_seed(0)
    return ref, build()


def _norm_on_rank(kind: str) -> dict:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    ref, model = _twins(lambda: NormChain(_norm(kind)))
    parallelize_module(model, mesh, {"up": ColwiseParallel(), "norm": GatheredNorm(), "down": RowwiseParallel()})
    return _compare(ref, model)


def _sinks_on_rank() -> dict:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    ref, model = _twins(Sinks)
    model.heads = HEADS // mesh.size()  # the per-rank head count, which tp.apply sets from the trace
    parallelize_module(model, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
    parallelize_module(model, mesh, ShardRows(params=("sinks",)))
    return _compare(ref, model)


def _assert_matches(results: list[dict]) -> None:
    for result in results:
        assert result["out"] <= 1e-5, result
        assert result["grads"] and max(result["grads"].values()) <= 1e-4, result


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_gathered_norm_matches_the_whole_norm(kind, pool2, pool4):
    for pool in (pool2, pool4):
        results = pool.run(_norm_on_rank, kind)
        _assert_matches(results)
        # the norm's all-gather and the row-parallel all-reduce
        assert results[0]["forward"] == {"all_gather_into_tensor": 1, "all_reduce": 1}, results[0]


def test_shard_rows_hold_each_ranks_heads(pool2, pool4):
    for pool in (pool2, pool4):
        _assert_matches(pool.run(_sinks_on_rank))


def _gate_on_rank() -> dict:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    ref, model = _twins(Gate)
    parallelize_module(model, mesh, {"up": ColwiseParallel(), "reduce": RowwiseIntoSharded(),
                                     "down": RowwiseParallel()})
    return _compare(ref, model)


def test_rowwise_into_sharded_sums_its_output_gradient(pool2, pool4):
    for pool in (pool2, pool4):
        results = pool.run(_gate_on_rank)
        _assert_matches(results)
        assert results[0]["forward"] == {"all_reduce": 2}, results[0]
