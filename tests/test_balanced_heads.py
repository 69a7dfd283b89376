"""Query heads that do not divide by the TP size split balanced, as evenly as they go (6 heads at
TP=4: 2, 2, 1, 1): in plain q/k/v/o linears, in fused projections of q, k and v parts (phi3's
``qkv_proj``, GPT-2's ``c_attn``, MPT's ``Wqkv``) and in fused projections of whole heads (Bloom,
GPT-NeoX and GPT-BigCode interleave each head's q, k and v).

Rank 0 computes heads 0-1, rank 1 heads 2-3, rank 2 head 4, rank 3 head 5. With fewer kv heads
than query heads (GQA), each rank holds the kv head of each of its query heads (by need: 6 query
heads reading 3 kv heads give ranks kv heads 0, 0 / 1, 1 / 2 / 2). No DTensor placement
gives ranks 2, 2, 1 and 1 heads (``Shard`` splits as ``torch.chunk``: 2, 2, 2, 0), so each
projection is stored whole on every rank (a replicated DTensor, as kv heads held by need), each
rank computes with its heads' rows, and the gradients are summed (one all-reduce per projection in
the backward). The compute is split; the attention's parameter memory is not. Checked against the
unsharded model (logits within 1e-5, gradients within 1e-4 relative); checkpoints load, decode and
save bit for bit, and torch's DCP reshards to an even split.
"""

import functools
import json

import pytest
import torch
from torch.distributed.tensor import DTensor

import tp
import tp.checks.sizes
from tp.sharding.heads import Heads
from tp.sharding.layouts import Layout, Part
from tp.testing import hf_checkpoint, torch_dcp
from tp.testing.models import tiny_model

MHA_6 = dict(num_attention_heads=6, num_key_value_heads=6, hidden_size=48, head_dim=8, intermediate_size=96)
GQA_6_3 = dict(MHA_6, num_key_value_heads=3)
FUSED = {  # family: (config, TP size)
    "phi3": (GQA_6_3, 4),  # qkv_proj [q; k; v] parts
    "gpt2": (dict(num_attention_heads=6, hidden_size=48, n_inner=96), 4),  # Conv1D c_attn and c_proj
    "mpt": (dict(num_attention_heads=6, hidden_size=48), 4),  # Wqkv; ALiBi sliced to each rank's heads
    "bloom": ({}, 3),  # 8 heads, each one's q, k and v together; ALiBi folded with the batch
    "gpt_neox": (dict(intermediate_size=96), 3),
}
HEADS = {"mha-6": MHA_6, "gqa-6q-3kv": GQA_6_3, "gqa-6q-2kv": dict(MHA_6, num_key_value_heads=2),
         "mqa-6q": dict(MHA_6, num_key_value_heads=1)}
IDS = torch.tensor([[5, 17, 42, 8, 99, 3, 64, 21]])


def test_six_heads_over_four_ranks_are_held_two_two_one_one():
    heads = Part(6, 8, balanced=True)
    assert [list(heads.local_units(4, rank)) for rank in range(4)] == [[0, 1], [2, 3], [4], [5]]
    assert Layout((heads,)).rows(4, 2) == list(range(32, 40))
    assert heads.repeats(4) and Layout((heads,)).placement(0, 4) is None  # stored whole
    assert not heads.repeats(2) and [list(heads.local_units(2, rank)) for rank in range(2)] == [[0, 1, 2], [3, 4, 5]]
    assert [Heads(6, 6, 8).local(4, rank).q for rank in range(4)] == [2, 2, 1, 1]
    # the kv heads of GQA follow their query heads, one per query head
    assert [Heads(6, 3, 8).local(4, rank) for rank in range(4)] == [Heads(2, 2, 8)] * 2 + [Heads(1, 1, 8)] * 2


@pytest.mark.parametrize("family, heads", [("llama", h) for h in HEADS] + [("qwen3", "gqa-6q-3kv")])
def test_balanced_heads_match_the_unsharded_model(family, heads, pool4):
    """qwen3 normalises each head's q and k with one shared weight (``head_norm``)."""
    result = tp.verify(model_factory=functools.partial(tiny_model, family, **HEADS[heads]), pool=pool4, tp=4)
    assert result.logits_max_abs <= 1e-5, result.table()
    assert result.worst_grad_rel <= 1e-4, result.table()
    assert result.gathered_exact, result.gathered_mismatch
    assert result.collectives_ok, result.table()
    # 2 all-reduces forward; backward 2 for the block inputs and 1 per projection stored whole
    assert result.per_block_forward == 2 and result.per_block_backward == 6, result.table()


def test_sequence_parallelism_with_balanced_heads(pool4):
    """Under sequence parallelism o_proj reads its local input as the heads split (2, 2, 1, 1) and
    reduce-scatters its partial output: the dense 2 all-gathers and 2 reduce-scatters per layer,
    the backward's mirror plus one all-reduce per projection stored whole."""
    result = tp.verify(model_factory=functools.partial(tiny_model, "llama", **HEADS["gqa-6q-3kv"]), pool=pool4, tp=4,
                       sequence_parallel=True)
    assert result.ok, result.table()
    assert result.first_block_forward == {"all_gather": 2, "reduce_scatter": 2}, result.table()
    assert result.per_block_backward == 4 + 4, result.table()
    assert result.activation_bytes_per_rank * 4 == result.activation_bytes_unsharded, result.table()


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_t5_relative_bias_follows_a_balanced_split(sequence_parallel, pool3):
    """T5's relative attention bias, an embedding of one column per head, splits as the heads do:
    8 heads at TP=3 as 3, 3, 2, stored whole with the projections (one more backward all-reduce)."""
    result = tp.verify("t5", pool=pool3, tp=3, sequence_parallel=sequence_parallel)
    assert result.ok, result.table()  # logits within 1e-5, gradients 1e-4, gathered exact, collectives
    assert result.param_bytes_per_rank * 3 > result.param_bytes_unsharded  # the attention stored whole


def _stored_heads(model) -> int:
    """The heads of the first q_proj this rank stores."""
    q_proj = model.model.layers[0].self_attn.q_proj
    return sum(p.to_local().shape[0] if isinstance(p, DTensor) else p.shape[0]
               for p in q_proj.parameters()) // 8


@pytest.mark.parametrize("heads", ["mha-6", "gqa-6q-3kv"])
def test_checkpoint_loads_decodes_and_saves_bit_for_bit(heads, pool4, tmp_path):
    reference = hf_checkpoint.save_and_decode(tiny_model("llama", **HEADS[heads]), IDS, tmp_path / "ckpt")
    found = pool4.run(hf_checkpoint.load_decode_save, str(tmp_path / "ckpt"), str(tmp_path / "saved"), IDS, _stored_heads)
    for rank in found:
        assert (rank["logits"] - reference["logits"]).abs().max().item() <= 1e-5
        assert torch.equal(rank["tokens"], reference["tokens"])
    assert [rank["inspected"] for rank in found] == [6, 6, 6, 6]  # stored whole
    assert hf_checkpoint.differing_tensors(tmp_path / "ckpt", tmp_path / "saved") == []


def test_cohere_per_head_norms_load_decode_and_save_bit_for_bit(pool4, tmp_path):
    """Cohere's q/k norms hold one weight row per head: at a balanced split they are stored whole
    with the projections, read into shards from a transformers checkpoint and saved back exactly."""
    model = tiny_model("cohere", use_qk_norm=True, **HEADS["mha-6"])
    reference = hf_checkpoint.save_and_decode(model, IDS, tmp_path / "ckpt")
    found = pool4.run(hf_checkpoint.load_decode_save, str(tmp_path / "ckpt"), str(tmp_path / "saved"), IDS)
    for rank in found:
        assert (rank["logits"] - reference["logits"]).abs().max().item() <= 1e-5
        assert torch.equal(rank["tokens"], reference["tokens"])
    assert hf_checkpoint.differing_tensors(tmp_path / "ckpt", tmp_path / "saved") == []


@pytest.mark.parametrize("heads", ["mha-6", "gqa-6q-3kv"])
def test_torch_dcp_reshards_balanced_heads_to_an_even_split(heads, pool2, pool4, tmp_path):
    """Saved at TP=4 (heads 2, 2, 1, 1: the projections whole), loaded at TP=2 (3 and 3)."""
    config = HEADS[heads]
    path, saved = str(tmp_path / "dcp"), functools.partial(tiny_model, "llama", **config)
    pool4.run(torch_dcp.save, saved, path)
    assert pool2.run(torch_dcp.mismatches, functools.partial(tiny_model, "llama", seed=1, **config), saved, path) == [[]] * 2


def test_plan_lists_the_rows_each_rank_computes_with(capsys):
    """The tiny llama (8 query heads, 4 kv heads) at TP=3: query heads 3, 3, 2, each rank's kv heads by need."""
    from tp import cli

    assert cli.main(["plan", "llama", "--tiny", "--tp", "3"]) in (0, None)
    text = capsys.readouterr().out
    assert "k_proj" in text and "weight [32, 64] -> [32, 64] (stored whole; each rank computes with 24 x2, 16 of dim 0)" in text
    assert "weight [64, 64] -> [64, 64] (stored whole; each rank computes with 24 x2, 16 of dim 1)" in text  # o_proj
    assert cli.main(["plan", "llama", "--tiny", "--tp", "3", "--json"]) in (0, None)
    plan = json.loads(capsys.readouterr().out)
    o_proj = next(m for m in plan["modules"] if m["module"].endswith("self_attn.o_proj"))
    assert o_proj["parameters"] == [{"name": "weight", "shape": [64, 64], "per_rank": [64, 64], "uneven": None,
                                     "computes": {"dim": 1, "sizes": [24, 24, 16]}}]


def test_a_gated_q_proj_needs_the_heads_to_divide():
    """Qwen3-Next's q_proj holds each head's q and output gate (2 blocks of head_dim per head), split
    as torch.chunk splits rows: only where the heads divide does that keep each head's blocks
    together, matching o_proj's balanced split."""
    model = tiny_model("qwen3_next", num_attention_heads=6, num_key_value_heads=2, hidden_size=48, head_dim=8,
                       num_hidden_layers=2, layer_types=["linear_attention", "full_attention"])
    lines, working = tp.checks.sizes.problems(model, tp.resolve(model, 4), 4)
    assert lines == ["model.layers.*.self_attn.q_proj: attention heads (2 blocks of head_dim each) = 6 does not "
                     "divide by tp=4"]
    assert working == [1, 2]


@pytest.mark.parametrize("family", sorted(FUSED))
def test_balanced_heads_in_fused_projections_match_the_unsharded_model(family, pool3, pool4):
    config, size = FUSED[family]
    result = tp.verify(model_factory=functools.partial(tiny_model, family, **config),
                       pool={3: pool3, 4: pool4}[size], tp=size)
    assert result.ok, result.table()  # logits within 1e-5, gradients 1e-4, gathered exact, collectives
    # the projections are stored whole: one more backward all-reduce per parameter
    assert result.per_block_forward == 2, result.table()


def test_sequence_parallelism_with_balanced_heads_in_gpt2(pool4):
    """GPT-2's c_attn and c_proj are Conv1D layers: the fused q/kv parts split balanced under
    sequence parallelism too."""
    config, size = FUSED["gpt2"]
    result = tp.verify(model_factory=functools.partial(tiny_model, "gpt2", **config), pool=pool4, tp=size,
                       sequence_parallel=True)
    assert result.ok, result.table()


def test_torch_dcp_reshards_fused_balanced_heads_to_an_even_split(pool2, pool4, tmp_path):
    """phi3 saved at TP=4 (the q part whole, heads 2, 2, 1, 1), loaded at TP=2 (3 and 3)."""
    config, _ = FUSED["phi3"]
    path, saved = str(tmp_path / "dcp"), functools.partial(tiny_model, "phi3", **config)
    pool4.run(torch_dcp.save, saved, path)
    assert pool2.run(torch_dcp.mismatches, functools.partial(tiny_model, "phi3", seed=1, **config), saved, path) == [[]] * 2


def test_attention_sinks_follow_a_balanced_split(pool3):
    """GPT-OSS (inferred plan): one learned sink per query head, 8 heads at TP=3 (3, 3, 2); the
    sinks are stored whole with the projections, each rank reading its heads' rows."""
    result = tp.verify(model_factory=functools.partial(tiny_model, "gpt_oss"), pool=pool3, tp=3)
    assert result.ok, result.table()
    assert result.per_block_forward == 1, result.table()  # experts stay whole


def test_a_norm_over_the_mlp_features_does_not_ask_the_heads_to_divide():
    """BitNet at published size (20 heads) and TP=8: the heads would split balanced, but the norm over
    o_proj's input (attn_sub_norm, gathered) cannot read that, so the attention stays whole; the
    norm over the MLP's intermediate features (ffn_sub_norm) reads no heads, so the MLP is sharded."""
    from transformers import AutoConfig

    from tp.infer.tiny import build

    model = build(AutoConfig.for_model("bitnet"), device="meta")
    assert tp.checks.sizes.unit_problems(model, tp.resolve(model, 8), 8) == {
        "BitNetDecoderLayer: self_attn.o_proj": "model.layers.*.self_attn.attn_sub_norm: attention heads "
                                                "(gathered_norm reads them split) = 20 does not divide by tp=8"}


def test_an_attention_kept_whole_keeps_its_head_counts(pool3):
    """The tiny llama at TP=3 with k_proj kept (fix_overrides keeps q, k, v and o whole): the
    attention computes with all its heads, so its num_key_value_groups stays 2, not the 1 of a
    rank holding its query heads' kv heads by need."""
    result = tp.verify("llama", tp=3, pool=pool3, keep=["k_proj"], fix_overrides=True)
    assert result.ok, result.table()
    assert result.per_block_forward == 1, result.table()  # the MLP's
