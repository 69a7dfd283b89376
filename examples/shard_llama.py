"""Shard a tiny Llama with tp.apply and check its logits against the unsharded model.

    python examples/shard_llama.py                                 # starts 2 CPU ranks itself (gloo)
    python examples/shard_llama.py --ranks 4                       # 4 local CPU ranks
    torchrun --nproc-per-node 2 examples/shard_llama.py            # CPU, gloo
    torchrun --nproc-per-node 8 examples/shard_llama.py --device cuda

On GPUs, replace the tiny config with ``AutoModelForCausalLM.from_pretrained(...)``: the call
to ``tp.apply`` stays the same.
"""

import argparse
import copy
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing tp

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import tp
from tp.testing.launch import WorkerPool
from tp.testing.models import build, family_config


def compare(device: str = "cpu") -> list[str]:
    """On every rank: shard a copy of one tiny Llama and compare its logits with the original's."""
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    torch.manual_seed(0)  # the same model and tokens on every rank
    reference = build(family_config("llama")).to(device)
    model = copy.deepcopy(reference)
    report = tp.apply(model, mesh)
    ids = torch.randint(3, 256, (2, 16), device=device)
    diff = (model(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max().item()
    return [str(report), f"logits max abs diff against the unsharded model: {diff:.2e}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ranks", type=int, default=2, help="local CPU ranks to start when not under torchrun")
    args = parser.parse_args()
    if "LOCAL_RANK" in os.environ:  # under torchrun
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        lines = compare(args.device)
        if dist.get_rank() == 0:
            print("\n".join(lines))
        dist.destroy_process_group()
    elif args.device != "cpu":
        sys.exit(f"--device {args.device} needs one process per device: "
                 f"torchrun --nproc-per-node N examples/shard_llama.py --device {args.device}")
    else:
        with WorkerPool(args.ranks) as pool:
            print("\n".join(pool.run(compare)[0]))


if __name__ == "__main__":
    main()
