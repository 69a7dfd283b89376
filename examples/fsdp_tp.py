"""Train with FSDP2 and tensor parallelism together on a 2-D (dp, tp) mesh; check against the unsharded model.

    torchrun --nproc-per-node 4 examples/fsdp_tp.py        # CPU, gloo: dp=2 x tp=2
    python examples/fsdp_tp.py                             # the same: starts 4 local processes itself
    python examples/fsdp_tp.py --steps 1                   # one training step
    torchrun --nnodes 2 --nproc-per-node 8 ... examples/fsdp_tp.py --device cuda --tp 8   # NCCL

How they compose (torchtitan's order), with dp the outer mesh dimension and tp the inner one,
so that the ranks of a tp group are neighbours (on GPUs: one node):

1. ``tp.apply(model, mesh["tp"])`` shards the linears over the tp ranks of each dp group.
2. ``fully_shard(layer, mesh=mesh["dp"])`` for every decoder layer, then for the whole model:
   FSDP2 shards each parameter (the tp shard, where tp sharded it) again over the dp ranks,
   all-gathers a layer's parameters over dp just before its forward and its backward, and
   reduce-scatters the gradients, averaged over dp.
3. Each dp rank trains on its own micro-batch; the tp ranks of one dp group share theirs.

The reference is the unsharded model trained on the concatenated global batch: with equal
micro-batches its mean loss is the mean of the dp ranks' losses, and its gradient is FSDP's
dp average. On GPUs the code is the same with ``--device cuda`` (NCCL) and a real model.
"""

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

try:
    import tp
except ImportError:  # a checkout that is not installed: use the repository's own package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import tp
from tp.testing.launch import WorkerPool
from tp.testing.models import tiny_model

BATCH, SEQ = 2, 8  # per dp rank
# The logits that tp gathers are a view; nothing here changes them in place, which is what FSDP warns of.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


def decoder_layers(model):
    """Hugging Face models name their decoder layer class in ``_no_split_modules``."""
    return [m for m in model.modules() if type(m).__name__ in model._no_split_modules]


def train(family: str, steps: int, tp_size: int, device: str) -> None:
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh(device, (world // tp_size, tp_size), mesh_dim_names=("dp", "tp"))
    dp_rank, dp_size = mesh["dp"].get_local_rank(), mesh["dp"].size()

    reference = tiny_model(family).to(device)  # one seed: the same weights on every rank
    model = tiny_model(family).to(device)
    tp.apply(model, mesh["tp"])
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])

    # the standard loop: every parameter is a DTensor, so foreach AdamW and clip_grad_norm_ take them
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    ref_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3, foreach=True)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        batch = torch.randint(3, model.config.vocab_size, (dp_size * BATCH, SEQ), generator=gen).to(device)
        mine = batch[dp_rank * BATCH:(dp_rank + 1) * BATCH]
        loss = model(input_ids=mine, labels=mine, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        loss = loss.detach()
        dist.all_reduce(loss, group=mesh["dp"].get_group())  # the global batch's mean loss
        loss /= dp_size

        ref_loss = reference(input_ids=batch, labels=batch, use_cache=False).loss
        ref_loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        ref_optimizer.step()
        ref_optimizer.zero_grad()
        if rank == 0:
            rel = abs(loss.item() - ref_loss.item()) / ref_loss.item()
            print(f"step {step}: loss fsdp+tp {loss.item():.7f}  unsharded {ref_loss.item():.7f}  "
                  f"rel diff {rel:.1e}", flush=True)

    full = tp.full_state_dict(model)  # unshards over dp, then gathers over tp
    diff = max((full[name] - p.detach()).abs().max().item() for name, p in reference.named_parameters())
    if rank == 0:
        print(f"{family}, dp={dp_size} x tp={tp_size}, after {steps} AdamW steps: "
              f"parameters max abs diff {diff:.1e}", flush=True)


def world_size_problem(world: int, tp_size: int) -> str | None:
    """Why ``world`` processes cannot make a (dp, tp) mesh with at least two dp groups, or None."""
    if tp_size >= 1 and world % tp_size == 0 and world // tp_size >= 2:
        return None
    return (f"examples/fsdp_tp.py needs {2 * tp_size} processes for dp=2 x tp={tp_size} (or any multiple of "
            f"{tp_size} with at least 2 dp groups), got {world}: "
            f"torchrun --nproc-per-node {2 * tp_size} examples/fsdp_tp.py"
            + (f" --tp {tp_size}" if tp_size != 2 else "") + ", or python examples/fsdp_tp.py without torchrun")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="llama")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if "RANK" in os.environ:  # under torchrun
        problem = world_size_problem(int(os.environ["WORLD_SIZE"]), args.tp)
        if problem:  # before the process group: every rank stops at once, one says why
            if os.environ["RANK"] == "0":
                print(f"error: {problem}", file=sys.stderr)
            sys.exit(2)
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        train(args.family, args.steps, args.tp, args.device)
        dist.destroy_process_group()
    else:
        with WorkerPool(2 * args.tp) as pool:  # dp=2 x tp local CPU processes joined by gloo
            pool.run(train, args.family, args.steps, args.tp, "cpu")


if __name__ == "__main__":
    main()
