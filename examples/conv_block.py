"""Shard a small convolutional network with tp.apply (family conv_example) and check it
against the unsharded model, forward and backward.

    python examples/conv_block.py                          # starts 2 CPU ranks itself (gloo)
    torchrun --nproc-per-node 2 examples/conv_block.py     # CPU, gloo

Each block's conv1 (C -> 2C) shards its output channels and conv2 (2C -> C) its input
channels, so a block costs one all-reduce in the forward and one in the backward.
"""

import copy
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing tp

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import tp
from tp.models.conv_block import ConvNet
from tp.testing.counter import CollectiveCounter
from tp.testing.launch import WorkerPool


def compare(seed: int = 0) -> list[str]:
    """On every rank: shard a ConvNet, train one step's forward and backward beside the unsharded one."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(seed)  # the same model and data on every rank
    reference = ConvNet(in_channels=3, channels=16, num_blocks=2, num_classes=10)
    model = copy.deepcopy(reference)
    report = tp.apply(model, mesh)  # family conv_example: conv1 on output channels, conv2 on input channels
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    x_ref, x = images.clone().requires_grad_(), images.clone().requires_grad_()

    logits_ref = reference(x_ref)
    nn.functional.cross_entropy(logits_ref, labels).backward()
    with CollectiveCounter() as forward:
        logits = model(x)
    loss = nn.functional.cross_entropy(logits, labels)
    with CollectiveCounter() as backward:
        loss.backward()

    def full(t):
        return t.full_tensor() if isinstance(t, DTensor) else t

    conv1 = model.blocks[0].conv1
    lines = [
        str(report),
        (
            f"tensor-parallel size {mesh.size()}; blocks.0.conv1.weight {tuple(conv1.weight.shape)} "
            f"{conv1.weight.placements}, local {tuple(conv1.weight.to_local().shape)}"
        ),
        f"collectives: forward {dict(forward.counts())}, backward {dict(backward.counts())}",
        f"{'output (logits)':<28} max abs diff {(logits - logits_ref).abs().max().item():.2e}",
        f"{'input gradient':<28} max abs diff {(x.grad - x_ref.grad).abs().max().item():.2e}",
    ]
    params = dict(model.named_parameters())
    for name, p_ref in reference.named_parameters():
        p = params[name]
        grad_diff = (full(p.grad) - p_ref.grad).abs().max().item()
        exact = "gathered param bit-exact" if torch.equal(full(p), p_ref) else "gathered param DIFFERS"
        placement = str(p.placements[0]) if isinstance(p, DTensor) else "plain"
        lines.append(f"{name + '.grad':<28} max abs diff {grad_diff:.2e}  ({placement}; {exact})")
    return lines


def main() -> None:
    if "LOCAL_RANK" in os.environ:  # under torchrun
        dist.init_process_group("gloo")
        lines = compare()
        if dist.get_rank() == 0:
            print("\n".join(lines))
        dist.destroy_process_group()
    else:
        with WorkerPool(2) as pool:
            print("\n".join(pool.run(compare)[0]))


if __name__ == "__main__":
    main()
