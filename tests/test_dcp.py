"""torch.distributed.checkpoint: a checkpoint saved at TP=2 loads at TP=4 and at TP=1, bit for bit."""

import pytest
import torch

import tp
import tp.testing.models
from tp.testing.launch import WorkerPool

CASES = {
    "llama": ("llama", {}),
    "llama_kv2": ("llama", {"num_key_value_heads": 2}),  # kv heads split at tp=2, replicated at tp=4
    "phi3_gqa": ("phi3", {"num_key_value_heads": 2}),     # unequal fused parts
    "yuan": ("yuan", {}),                                 # strided v/o halves
    "gpt2": ("gpt2", {}),                                 # Conv1D, tied embeddings
}


def _save(family: str, overrides: dict, path: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    model = tp.testing.models.tiny_model(family, **overrides)
    tp.apply(model, init_device_mesh("cpu", (dist.get_world_size(),)))
    tp.dcp.save(model, path)


def _load(family: str, overrides: dict, path: str) -> list[str]:
    """Names of the tensors that differ from the original after loading into another model."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    original = tp.testing.models.tiny_model(family, **overrides).state_dict()
    model = tp.testing.models.tiny_model(family, seed=123, **overrides)  # other weights, overwritten by the load
    tp.apply(model, init_device_mesh("cpu", (dist.get_world_size(),)))
    tp.dcp.load(model, path)
    full = tp.full_state_dict(model)
    return [name for name, tensor in original.items() if not torch.equal(full[name], tensor)]


@pytest.fixture(scope="module")
def pool1():
    with WorkerPool(1) as pool:
        yield pool


@pytest.mark.parametrize("case", sorted(CASES))
def test_saved_at_tp2_loads_at_tp4_and_tp1(case, pool1, pool2, pool4, tmp_path):
    family, overrides = CASES[case]
    pool2.run(_save, family, overrides, str(tmp_path / "ckpt"))
    for pool in (pool4, pool1):
        for differing in pool.run(_load, family, overrides, str(tmp_path / "ckpt")):
            assert differing == [], differing
