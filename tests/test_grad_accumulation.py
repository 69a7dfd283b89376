"""Gradient accumulation with kv heads replicated over ranks: each micro-batch's gradient of the
replicated rows is summed over the replicas once, so two backwards give the unsharded sum."""

import copy

import torch

import tp
import tp.testing.models


def _accumulate() -> float:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    reference = tp.testing.models.tiny_model("llama", num_key_value_heads=1)
    model = copy.deepcopy(reference)
    tp.apply(model, init_device_mesh("cpu", (dist.get_world_size(),)))
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        ids = torch.randint(3, 256, (2, 8), generator=gen)
        reference(input_ids=ids, labels=ids).loss.backward()
        model(input_ids=ids, labels=ids).loss.backward()
    name = "model.layers.0.self_attn.k_proj.weight"
    ours, theirs = tp.full_parameters(model, grads=True)[name], dict(reference.named_parameters())[name].grad
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def test_two_micro_batches_accumulate_like_the_unsharded_model(pool2):
    for rel in pool2.run(_accumulate):
        assert rel <= 1e-4, rel
