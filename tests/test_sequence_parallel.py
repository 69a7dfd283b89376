"""Sequence parallelism: activations between blocks sharded along the sequence.

Per layer the forward costs 2 all-gathers (each block input, once) and 2 reduce-scatters (each
row-parallel output), the backward their mirror; the residual stream between blocks holds 1/N
of the unsharded bytes on each rank. Same tolerances as test_families.py.
"""


import pytest

import tp
import tp.testing.models
from tests.test_families import EXTRA_BACKWARD, FAMILIES

# Yuan's sharded localized filtering all-reduces conv2's output inside attention (registry.toml).
INNER_ALL_REDUCES = {"yuan": 1}
REFUSED = {"opt": "flattens batch and sequence", "mixtral": "packed experts", "mamba": "whole sequence", "jamba": "whole sequence", "mamba2": "whole sequence", "bamba": "whole sequence", "zamba2": "whole sequence"}


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in REFUSED])
def test_family_with_sequence_parallel(family, pool2):
    result = tp.verify(family, tp=2, pool=pool2, sequence_parallel=True)
    assert result.ok, result.table()
    inner = {"all_reduce": INNER_ALL_REDUCES[family]} if family in INNER_ALL_REDUCES else {}
    assert result.first_block_forward == {"all_gather": 2, "reduce_scatter": 2, **inner}, result.table()
    assert result.activation_bytes_per_rank * 2 == result.activation_bytes_unsharded, result.table()
    assert result.per_block_backward == 4 + EXTRA_BACKWARD.get(family, 0), result.table()


def test_llama_collectives_and_activation_bytes(pool2, pool4):
    result = tp.verify("llama", tp=2, pool=pool2, sequence_parallel=True)
    blocks = result.blocks
    # + embedding reduce-scatter; + lm_head input and logits all-gathers
    assert result.forward_collectives == {"all_gather": 2 * blocks + 2, "reduce_scatter": 2 * blocks + 1}
    # the mirror: + embedding all-gather; + lm_head input reduce-scatter
    assert result.backward_collectives == {"all_gather": 2 * blocks + 1, "reduce_scatter": 2 * blocks + 1}
    quarter = tp.verify("llama", tp=4, pool=pool4, sequence_parallel=True)
    assert quarter.ok and quarter.activation_bytes_per_rank * 4 == quarter.activation_bytes_unsharded


def test_without_sequence_parallel_activations_stay_whole(pool2):
    result = tp.verify("llama", tp=2, pool=pool2)
    assert result.activation_bytes_per_rank == result.activation_bytes_unsharded


def test_plan_shows_the_sync_points():
    model = tp.testing.models.tiny_model("gpt2")
    plan = tp.resolve(model, 2, sequence_parallel=True)
    wpe = plan.decisions["transformer.wpe"]
    assert (str(wpe.style), wpe.source) == ("sequence_shard", "family gpt2 (sequence parallel)")
    assert str(plan.decisions["transformer.h.0.ln_1"].style) == "sequence_parallel"
    assert plan.decisions["transformer.ln_f"].source == "derived (sequence parallel)"
    assert str(plan.decisions["transformer.h.0.attn.c_proj"].style) == "rowwise(sequence_dim=1)"
    assert str(plan.decisions["lm_head"].style) == "lm_head(sequence_dim=1)"


@pytest.mark.parametrize("family, words", REFUSED.items())
def test_refused_families_say_why(family, words):
    model = tp.testing.models.tiny_model(family)
    with pytest.raises(tp.PlanError, match=words):
        tp.resolve(model, 2, sequence_parallel=True)
    tp.resolve(model, 2)  # tensor parallelism alone is fine


def test_registry_sync_points_are_validated(mine_registry, llama_meta):
    path = mine_registry('"model.embed_tokens" = { style = "sequence_shard", sequence_dim = "one" }',
                         "sequence_parallel")
    with pytest.raises(tp.RegistryError):
        tp.resolve(llama_meta, 2, registry=path, sequence_parallel=True)
    path = mine_registry("""
        "model.rotary_emb" = "sequence_shard"
        "layers.*.nothing_here" = "sequence_shard"
        """, "sequence_parallel")
    with pytest.warns(UserWarning, match="'layers.\\*.nothing_here' matches no module"):
        plan = tp.resolve(llama_meta, 2, registry=path, sequence_parallel=True)
    assert plan.decisions["model.rotary_emb"].style.name == "sequence_shard"
