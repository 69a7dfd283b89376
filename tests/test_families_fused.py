"""Families with a fused query_key_value: GPT-NeoX, Persimmon, Falcon and GPT-BigCode.

Their q, k and v come from one linear, laid out per head (``[heads, 3, head_dim]``: GPT-NeoX,
Persimmon, Falcon and GPT-BigCode without multi-query), as ``[q; k; v]`` with a single k/v head
that every rank keeps (Falcon-7B, StarCoder: multi-query), or in kv groups
(``[kv_heads, q_per_kv + 2, head_dim]``: Falcon-40B/180B). Falcon and GPT-BigCode pick the
layout from the config in plans/falcon.py and plans/gpt_bigcode.py.

Falcon models are built here from a FalconConfig, one per variant. Falcon variants with
parallel attention add the MLP output in place to the attention output
(``mlp_output += attention_output``), which the row-parallel styles' outputs allow.
"""

from __future__ import annotations

import functools
import inspect
import re

import pytest
import torch
from transformers.models.falcon.modeling_falcon import FalconAttention

import tp
import tp.checks.sizes
import tp.testing.models
from tp.sharding.layouts import Part
from tp.testing import hf_checkpoint, torch_dcp
from tp.testing.verify import VerifyResult

FALCON_SIZES = {"hidden_size": 64, "num_attention_heads": 8, "num_hidden_layers": 2, "ffn_hidden_size": 128,
                "vocab_size": 256, "max_position_embeddings": 128, "pad_token_id": 0, "bos_token_id": 1,
                "eos_token_id": 2}
IDS = torch.tensor([[5, 17, 42, 8, 99, 3, 64, 21]])

def falcon_model(**overrides):
    """A tiny Falcon (module level: every rank of a pool builds it)."""
    from transformers import FalconConfig

    import tp.testing.models

    return tp.testing.models.build(FalconConfig(**{**FALCON_SIZES, **overrides}))


def _verify_falcon(pool, tp_size: int, **overrides) -> VerifyResult:
    assert pool.world_size == tp_size
    return tp.verify(model_factory=functools.partial(falcon_model, **overrides), pool=pool, tp=tp_size)


def _check(result: VerifyResult, *, backward_per_block: int = 2) -> None:
    assert result.logits_max_abs <= 1e-5, result.table()
    assert result.worst_grad_rel <= 1e-4, result.table()
    assert result.gathered_exact, result.gathered_mismatch
    assert result.collectives_ok, result.table()
    assert result.per_block_forward == 2, result.table()
    assert result.per_block_backward == backward_per_block, result.table()
    assert result.ok


# GPT-NeoX and Persimmon: per-head interleaved q, k, v.

def test_gpt_neox_tp2(pool2):
    result = tp.verify("gpt_neox", tp=2, pool=pool2)
    _check(result)
    assert "colwise(unit=head)" in result.report
    assert result.param_bytes_per_rank < result.param_bytes_unsharded


def test_gpt_neox_tp4(pool4):
    _check(tp.verify("gpt_neox", tp=4, pool=pool4))


def test_persimmon_shared_qk_layernorms_tp2(pool2):
    """qk_layernorm (the default): one LayerNorm(head_dim) for all q heads, one for all k heads."""
    result = tp.verify("persimmon", tp=2, pool=pool2)
    _check(result)
    assert "q_layernorm" in result.report and "head_norm" in result.report


def test_persimmon_tp4(pool4):
    _check(tp.verify("persimmon", tp=4, pool=pool4))


def test_persimmon_without_qk_layernorm(pool2):
    result = tp.verify("persimmon", tp=2, pool=pool2, config_overrides={"qk_layernorm": False})
    _check(result)
    assert "head_norm" not in result.report


# GPT-BigCode: multi-query (the default, StarCoder) or per-head interleaved.

@pytest.mark.parametrize("size", [2, 4])
def test_gpt_bigcode_multi_query(size, pool2, pool4):
    """The single k/v head is on every rank; its weight and bias gradients are summed over the
    ranks: two all-reduces per layer more than Megatron's two."""
    result = tp.verify("gpt_bigcode", tp=size, pool={2: pool2, 4: pool4}[size],
                       config_overrides={"multi_query": True})
    _check(result, backward_per_block=4)
    assert re.search(r"c_attn +Linear +colwise\(parts=\W*q\W+kv\W+kv", result.report), result.report


@pytest.mark.parametrize("size", [2, 4])
def test_gpt_bigcode_multi_head(size, pool2, pool4):
    result = tp.verify("gpt_bigcode", tp=size, pool={2: pool2, 4: pool4}[size],
                       config_overrides={"multi_query": False})
    _check(result)
    assert "colwise(unit=head)" in result.report


# Falcon: three layouts of query_key_value, and ALiBi.

def test_falcon_7b_layout_multi_query_parallel_attention(pool2):
    """The config default (Falcon-7B): multi-query, attention and MLP side by side."""
    result = _verify_falcon(pool2, 2)
    _check(result, backward_per_block=3)  # + the replicated k/v rows' gradient sum


@pytest.mark.parametrize("size", [2, 4])
def test_falcon_new_decoder_architecture_kv_groups(size, pool2, pool4):
    """Falcon-40B/180B: 8 query heads in 4 kv groups; each rank holds whole groups."""
    result = _verify_falcon({2: pool2, 4: pool4}[size], size, new_decoder_architecture=True, num_kv_heads=4)
    _check(result)
    assert "colwise(unit=group)" in result.report


def test_falcon_multi_head_parallel_attention(pool2):
    _check(_verify_falcon(pool2, 2, multi_query=False))


@pytest.mark.parametrize("multi_query", [True, False])
def test_falcon_sequential_attention_tp2(multi_query, pool2):
    result = _verify_falcon(pool2, 2, parallel_attn=False, multi_query=multi_query)
    _check(result, backward_per_block=3 if multi_query else 2)


def test_falcon_multi_head_sequential_attention_tp4(pool4):
    _check(_verify_falcon(pool4, 4, parallel_attn=False, multi_query=False, bias=True))


@pytest.mark.parametrize("size", [2, 4])
def test_falcon_rw_alibi(size, pool2, pool4):
    """Falcon-RW: ALiBi, per-head q/k/v, biases, sequential attention. The bias and the mask it
    is folded into are built for all heads; head_input hands each rank its own heads. 12 heads
    at tp=4: not a power of two, so the slopes interleave two series."""
    heads = {2: {"num_attention_heads": 8, "hidden_size": 64}, 4: {"num_attention_heads": 12, "hidden_size": 96}}
    result = _verify_falcon({2: pool2, 4: pool4}[size], size, alibi=True, parallel_attn=False,
                            multi_query=False, bias=True, **heads[size])
    _check(result)
    assert "head_input(head_dim=1, kwarg=attention_mask)" in result.report
    # up to transformers 5.24 the attention takes the bias itself too; from 5.25 only through the mask
    takes_alibi = "alibi" in inspect.signature(FalconAttention.forward).parameters
    assert ("head_input(head_dim=1, kwarg=alibi)" in result.report) == takes_alibi


def test_a_kv_group_shared_by_ranks_gives_each_its_query_heads_and_the_groups_k_and_v():
    group = Part(2, 6 * 4, group_q=4)  # 2 groups of [4 q heads; k; v], 4 rows per head
    assert [group.local_rows(4, rank) for rank in range(4)] == [
        [*range(8), *range(16, 24)], [*range(8, 16), *range(16, 24)],
        [*range(24, 32), *range(40, 48)], [*range(32, 40), *range(40, 48)]]
    assert group.local_rows(2, 1) == list(range(24, 48))  # whole groups where they split
    assert Part(2, 5 * 4, group_q=3).problem(4) is not None  # 3 query heads do not split over 2 ranks


@pytest.mark.parametrize("kv_groups", [2, 1])
def test_falcon_ranks_share_kv_groups_when_there_are_fewer_than_ranks(kv_groups, pool4):
    """Falcon-40B's layout with fewer kv groups than ranks: each of a group's ranks holds its share
    of the group's query heads and the group's k and v (one kv head per rank). query_key_value is
    stored whole, replicated, and the gradients of the shared rows are summed: one more backward
    all-reduce per block, as for TP > kv heads elsewhere."""
    _check(_verify_falcon(pool4, 4, new_decoder_architecture=True, num_kv_heads=kv_groups), backward_per_block=3)


def test_falcon_kv_groups_shared_by_ranks_under_sequence_parallelism(pool4):
    result = tp.verify(model_factory=functools.partial(falcon_model, new_decoder_architecture=True, num_kv_heads=2),
                       pool=pool4, tp=4, sequence_parallel=True)
    assert result.logits_max_abs <= 1e-5 and result.worst_grad_rel <= 1e-4, result.table()
    assert result.gathered_exact and result.collectives_ok, result.table()
    assert result.activation_bytes_per_rank * 4 == result.activation_bytes_unsharded, result.table()


def test_falcon_with_kv_groups_shared_by_ranks_loads_decodes_and_saves_bit_for_bit(pool4, tmp_path):
    model = falcon_model(new_decoder_architecture=True, num_kv_heads=2)
    reference = hf_checkpoint.save_and_decode(model, IDS, tmp_path / "ckpt")
    for found in pool4.run(hf_checkpoint.load_decode_save, str(tmp_path / "ckpt"), str(tmp_path / "saved"), IDS):
        assert (found["logits"] - reference["logits"]).abs().max().item() <= 1e-5
        assert torch.equal(found["tokens"], reference["tokens"])
    # tied: the lm_head is written once, as the unsharded model writes it
    assert hf_checkpoint.differing_tensors(tmp_path / "ckpt", tmp_path / "saved") == []


def test_torch_dcp_reshards_falcon_kv_groups_shared_by_ranks_to_whole_groups(pool2, pool4, tmp_path):
    """Saved at TP=4 (2 groups shared by 2 ranks each: query_key_value whole), loaded at TP=2 (a group per rank)."""
    path, saved = str(tmp_path / "dcp"), functools.partial(falcon_model, new_decoder_architecture=True, num_kv_heads=2)
    pool4.run(torch_dcp.save, saved, path)
    assert pool2.run(torch_dcp.mismatches, _other_falcon, saved, path) == [[]] * 2


def _other_falcon():
    """The Falcon of the test above with other values (its modules' own initialisation, seed 1)."""
    torch.manual_seed(1)
    model = falcon_model(new_decoder_architecture=True, num_kv_heads=2)
    model.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    return model


def test_falcon_kv_groups_whose_query_heads_do_not_split_are_refused():
    """2 groups of 3 query heads at tp=4: a group's 2 ranks cannot share 3 heads."""
    model = falcon_model(new_decoder_architecture=True, num_kv_heads=2, num_attention_heads=6, hidden_size=48)
    plan = tp.resolve(model, 4)
    with pytest.raises(tp.SizeError, match=r"query_key_value.*2 kv groups.*tp=4") as error:
        tp.checks.sizes.check(model, plan, 4)
    assert "TP sizes that divide every sharded size of this model: 1, 2" in str(error.value)
