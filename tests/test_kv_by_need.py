"""kv heads held by need: GQA where the kv heads neither split over the TP size nor divide it.

6 query heads in 3 kv groups at TP=2: rank 0 computes query heads 0-2, which read kv heads 0, 0
and 1; rank 1 computes 3-5, reading 1, 2, 2. Each rank holds the kv head of each of its query
heads, in order (one kv head per query head, ``num_key_value_groups`` 1 on the rank); the k and v
weights are stored whole and replicated, and the gradients of the rows several ranks use are
summed. 12 heads in 4 groups at TP=3 likewise. Checked against the unsharded model (logits within
1e-5, gradients within 1e-4 relative), for separate k/v (llama) and a fused ``qkv_proj`` (phi3);
checkpoints load and save bit for bit, and torch's DCP reshards them to an even split.
"""

import functools

import pytest
import torch

import tp
from tp.sharding.heads import Heads
from tp.sharding.layouts import Part
from tp.testing import hf_checkpoint, torch_dcp
from tp.testing.models import tiny_model

GQA_6_3 = dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=48, head_dim=8)
GQA_12_4 = dict(num_attention_heads=12, num_key_value_heads=4, hidden_size=96, head_dim=8)
PHI3_AT_2_AND_3 = dict(GQA_6_3, intermediate_size=96)  # gate and up split evenly over 2 and 3 ranks
IDS = torch.tensor([[5, 17, 42, 8, 99, 3, 64, 21]])


def test_each_rank_holds_the_kv_head_of_each_of_its_query_heads():
    kv = Part(3, 8, replicable=True, serves=6)
    assert [list(kv.local_units(2, rank)) for rank in range(2)] == [[0, 0, 1], [1, 2, 2]]
    kv = Part(4, 8, replicable=True, serves=12)
    assert [list(kv.local_units(3, rank)) for rank in range(3)] == [[0, 0, 0, 1], [1, 1, 2, 2], [2, 3, 3, 3]]
    # where the kv heads split or divide the ranks, they are held as before
    assert [list(Part(4, 8, replicable=True, serves=12).local_units(2, r)) for r in range(2)] == [[0, 1], [2, 3]]
    assert [list(Part(2, 8, replicable=True, serves=12).local_units(4, r)) for r in range(4)] == [[0], [0], [1], [1]]
    assert Heads(6, 3, 8).local(2) == Heads(3, 3, 8) and Heads(6, 3, 8).local(2).count("groups") == 1
    # query heads split balanced (6 over 4 ranks: 2, 2, 1, 1): each rank's kv heads follow them
    kv = Part(3, 8, replicable=True, serves=6)
    assert [list(kv.local_units(4, rank)) for rank in range(4)] == [[0, 0], [1, 1], [2], [2]]
    kv = Part(2, 8, replicable=True, serves=6)  # tp a multiple of the kv heads, but rank 1 reads both
    assert [list(kv.local_units(4, rank)) for rank in range(4)] == [[0, 0], [0, 1], [1], [1]]
    assert [Heads(6, 3, 8).local(4, rank) for rank in (0, 3)] == [Heads(2, 2, 8), Heads(1, 1, 8)]
    assert Heads(6, 3, 8).problems(4) == [] and Heads(6, 3, 8).problems(8) == ["6 attention heads do not divide by tp=8"]


@pytest.mark.parametrize("family, heads, size", [
    pytest.param("llama", GQA_6_3, 2, id="llama-6q-3kv-tp2"),
    pytest.param("phi3", GQA_6_3, 2, id="phi3-6q-3kv-tp2"),  # k and v parts of the fused qkv_proj
    pytest.param("llama", GQA_12_4, 3, id="llama-12q-4kv-tp3"),
])
def test_kv_heads_by_need_match_the_unsharded_model(family, heads, size, pool2, pool3):
    result = tp.verify(model_factory=functools.partial(tiny_model, family, **heads),
                       pool={2: pool2, 3: pool3}[size], tp=size)
    assert result.logits_max_abs <= 1e-5, result.table()
    assert result.worst_grad_rel <= 1e-4, result.table()
    assert result.gathered_exact, result.gathered_mismatch
    assert result.collectives_ok and result.per_block_forward == 2, result.table()


def _kv_heads(model) -> tuple[int, int]:
    """The kv heads this rank's first attention computes with, and its kv groups."""
    attention = model.model.layers[0].self_attn
    return attention.k_proj.weight.to_local().shape[0] // 8, attention.num_key_value_groups


def test_checkpoint_loads_decodes_and_saves_bit_for_bit(pool2, tmp_path):
    reference = hf_checkpoint.save_and_decode(tiny_model("llama", **GQA_6_3), IDS, tmp_path / "ckpt")
    for found in pool2.run(hf_checkpoint.load_decode_save, str(tmp_path / "ckpt"), str(tmp_path / "saved"), IDS,
                           _kv_heads):
        assert (found["logits"] - reference["logits"]).abs().max().item() <= 1e-5
        assert torch.equal(found["tokens"], reference["tokens"])
        assert found["inspected"] == (3, 1)  # stored whole; one kv head per query head
    assert hf_checkpoint.differing_tensors(tmp_path / "ckpt", tmp_path / "saved") == []


def test_torch_dcp_reshards_kv_held_by_need_to_an_even_split(pool2, pool3, tmp_path):
    """Saved at TP=2 (kv heads by need: k and v parts replicated), loaded at TP=3 (3 kv heads split)."""
    path, saved = str(tmp_path / "dcp"), functools.partial(tiny_model, "phi3", **PHI3_AT_2_AND_3)
    pool2.run(torch_dcp.save, saved, path)
    other = functools.partial(tiny_model, "phi3", seed=1, **PHI3_AT_2_AND_3)
    assert pool3.run(torch_dcp.mismatches, other, saved, path) == [[]] * 3
