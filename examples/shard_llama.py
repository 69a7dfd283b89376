"""Shard a tiny Llama over the ranks of a torchrun launch and check it against the unsharded model.

    torchrun --nproc-per-node 2 examples/shard_llama.py            # CPU, gloo
    torchrun --nproc-per-node 8 examples/shard_llama.py --device cuda

On GPUs, replace the tiny config with ``AutoModelForCausalLM.from_pretrained(...)``: the call
to ``tp.apply`` stays the same.
"""

import argparse
import copy
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import tp
from tp.testing.models import build, family_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    mesh = init_device_mesh(args.device, (int(os.environ["WORLD_SIZE"]),))

    reference = build(family_config("llama")).to(args.device)
    model = copy.deepcopy(reference)
    report = tp.apply(model, mesh)
    if dist.get_rank() == 0:
        print(report)

    ids = torch.randint(3, 256, (2, 16), device=args.device)
    diff = (model(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max().item()
    if dist.get_rank() == 0:
        print(f"logits max abs diff against the unsharded model: {diff:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
