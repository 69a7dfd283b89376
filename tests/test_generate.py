"""Token-by-token decoding with the KV cache: greedy generate() of a tp-sharded model gives the
unsharded model's tokens, for every registered family that generates, at TP=2."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import tp
from tp.plan.registry import load_registry
from tp.testing.models import tiny_model

REGISTRY = load_registry()
ENCODER_DECODER = {"t5", "bart", "whisper"}  # their generate needs encoder inputs; verified by tp.verify
FAMILIES = [f for f in REGISTRY.families if REGISTRY.inherited(f, "model_types") and f not in ENCODER_DECODER]


def _generate_on_rank(family: str) -> tuple[list, list]:
    model = tiny_model(family).eval()
    reference = copy.deepcopy(model)
    tp.apply(model, init_device_mesh("cpu", (dist.get_world_size(),)))
    prompt = torch.randint(3, 200, (2, 5), generator=torch.Generator().manual_seed(0))
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        return reference.generate(prompt, **options).tolist(), model.generate(prompt, **options).tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_decoding_gives_the_unsharded_tokens(family, pool2):
    for unsharded, sharded in pool2.run(_generate_on_rank, family):
        assert sharded == unsharded
        assert len(unsharded[0]) == 13  # 5 prompt tokens and 8 generated: decoding ran
