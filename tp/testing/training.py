"""Train a sharded model beside the unsharded one and compare them step by step.

Every rank builds the same model, keeps an unsharded copy, shards the other with ``tp.apply``
and runs the same training loop on the same batches on both, as a user writes it: torch's AdamW
(foreach by default, or fused) and, if asked, ``torch.nn.utils.clip_grad_norm_`` over all
parameters. ``compare_training`` returns the loss and gradient norm of every step for both, and
the largest difference between the trained parameters.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..sharding.gather import full_parameters, full_tensor


@dataclass(frozen=True)
class TrainingSpec:
    family: str
    steps: int = 20
    lr: float = 1e-3
    eps: float = 1e-8  # AdamW's epsilon
    batch: int = 2
    seq: int = 16
    seed: int = 0
    apply_kwargs: tuple = ()
    config_overrides: tuple = ()
    optimizer: tuple = (("foreach", True),)  # AdamW's keyword arguments besides lr and eps
    clip: float | None = None  # clip_grad_norm_'s max_norm; None: no clipping


def causal_lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy. Vocab-sharded logits (``tp.apply(..., loss_parallel=True)``)
    go through torch's vocab-parallel cross-entropy and are never gathered."""
    from torch.distributed.tensor.parallel import loss_parallel

    with loss_parallel():
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
    return loss.detach()


def compare_training(spec: TrainingSpec) -> dict:
    """Run on every rank of a process group; returns per-step losses and the trained parameters' gap."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from ..infer.tiny import build
    from ..parallelize import apply
    from .models import family_config

    reference = build(family_config(spec.family, **dict(spec.config_overrides)), seed=spec.seed).train()
    model = copy.deepcopy(reference)
    apply(model, init_device_mesh("cpu", (dist.get_world_size(),)), **dict(spec.apply_kwargs))
    optimizers = [torch.optim.AdamW(m.parameters(), lr=spec.lr, eps=spec.eps, **dict(spec.optimizer))
                  for m in (reference, model)]

    gen = torch.Generator().manual_seed(spec.seed + 1)
    vocab = reference.get_input_embeddings().num_embeddings
    losses = {"reference": [], "sharded": []}
    norms = {"reference": [], "sharded": []}
    for _ in range(spec.steps):
        ids = torch.randint(3, vocab, (spec.batch, spec.seq), generator=gen)
        for name, m, opt in (("reference", reference, optimizers[0]), ("sharded", model, optimizers[1])):
            loss = causal_lm_loss(m, ids)
            if spec.clip is not None:
                norms[name].append(full_tensor(torch.nn.utils.clip_grad_norm_(m.parameters(), spec.clip)).item())
            opt.step()
            opt.zero_grad()
            losses[name].append(full_tensor(loss).item())
    trained = dict(reference.named_parameters())
    gaps = {name: (p - trained[name].detach()).abs().max().item() for name, p in full_parameters(model).items()}
    worst = max(gaps, key=gaps.get)
    return {"losses": losses, "norms": norms, "worst_param": worst, "worst_param_gap": gaps[worst]}
