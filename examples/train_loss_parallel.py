"""Train a tiny Llama with tensor + sequence parallelism and vocab-parallel cross-entropy,
beside the unsharded model, and print both losses at every step.

    python examples/train_loss_parallel.py                        # starts 2 CPU ranks itself (gloo)
    python examples/train_loss_parallel.py --steps 2              # fewer steps (default 10)
    torchrun --nproc-per-node 2 examples/train_loss_parallel.py   # the same under torchrun

``tp.apply(model, mesh, loss_parallel=True, sequence_parallel=True)`` leaves the logits a
vocab-sharded DTensor: inside ``torch.distributed.tensor.parallel.loss_parallel()`` the
cross-entropy is computed on the shards, so the full ``[batch, sequence, vocab]`` logits never
exist on one rank (``tp.testing.training.causal_lm_loss``). On GPUs it is the same code with NCCL and
``init_device_mesh("cuda", ...)``.
"""

import argparse
import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing tp

import torch.distributed as dist

from tp.testing.launch import WorkerPool
from tp.testing.training import TrainingSpec, compare_training

SPEC = TrainingSpec("llama", steps=10, apply_kwargs=(("loss_parallel", True), ("sequence_parallel", True)))


def report(result: dict) -> str:
    lines = ["step  unsharded   tp=2+sp+loss_parallel  rel. diff"]
    for step, (a, b) in enumerate(zip(result["losses"]["reference"], result["losses"]["sharded"])):
        lines.append(f"{step:4d}  {a:.6f}    {b:.6f}               {abs(a - b) / abs(a):.1e}")
    lines.append(f"largest trained-parameter difference: {result['worst_param_gap']:.1e} ({result['worst_param']})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=SPEC.steps, help=f"training steps (default {SPEC.steps})")
    spec = dataclasses.replace(SPEC, steps=parser.parse_args().steps)
    if "LOCAL_RANK" in os.environ:  # under torchrun
        dist.init_process_group("gloo")
        result = compare_training(spec)
        if dist.get_rank() == 0:
            print(report(result))
        dist.destroy_process_group()
    else:
        with WorkerPool(2) as pool:
            print(report(pool.run(compare_training, spec)[0]))


if __name__ == "__main__":
    main()
