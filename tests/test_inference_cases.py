"""Inferred plans on tiny transformers models whose structure needed more than column/row pairs.

Each model is sharded with ``tp.apply(model, mesh)`` and nothing else and compared with the
unsharded model by ``tp.verify`` (logits 1e-5 absolute, gradients 1e-4 relative, parameters
gathered exact, collectives as the report predicts). The report says which style each module got
and which units stayed whole, and why.
"""

import functools
import re

import pytest
import torch
from torch import nn

import tp
from tp.plan.structure import find_blocks
from tp.testing.census import tiny_model


def _verify(model_type: str, pool, size: int = 2):
    result = tp.verify(model_factory=functools.partial(tiny_model, model_type), tp=size, pool=pool)
    assert result.logits_max_abs <= 1e-5 and result.worst_grad_rel <= 1e-4, result.table()
    assert result.gathered_exact, result.gathered_mismatch
    return result


def _style(result, module: str) -> str:
    row = next(line for line in result.report.splitlines() if line.startswith(module + " "))
    return re.split(r"\s{2,}", row)[2]  # columns: module, type, style, ...


def _whole(result) -> list[str]:
    return [line for line in result.report.splitlines() if line.startswith("warning:") and "stays whole" in line]


def test_bert_lm_head_sharded_with_its_tied_bias(pool2):
    """BERT's prediction head holds its decoder's bias: the unstyled holder takes the sharded one."""
    result = _verify("bert", pool2)
    assert _style(result, "cls.predictions.decoder") == "lm_head" and not _whole(result)
    assert result.collectives_ok and result.per_block_forward == 2


@pytest.mark.parametrize("size", [2, 4])
def test_norm_over_all_heads_is_gathered(size, pool2, pool4):
    """OLMo 2 normalises q and k over all heads: gathered_norm, one all-gather each."""
    result = _verify("olmo2", {2: pool2, 4: pool4}[size], size)
    assert _style(result, "model.layers.0.self_attn.q_norm") == "gathered_norm"
    assert not _whole(result) and result.collectives_ok
    assert result.first_block_forward == {"all_reduce": 2, "all_gather": 2}


def test_bitnet_sub_norms_before_the_row_linears(pool2):
    result = _verify("bitnet", pool2)
    assert _style(result, "model.layers.0.self_attn.attn_sub_norm") == "gathered_norm"
    assert _style(result, "model.layers.0.mlp.ffn_sub_norm") == "gathered_norm"
    assert not _whole(result) and result.collectives_ok


@pytest.mark.parametrize("size", [2, 4])
def test_attention_sinks_sharded_with_the_heads(size, pool2, pool4):
    """GPT-OSS: one sink per head on the attention module (shard_rows); its experts carry
    biases, a layout the experts style does not take, so they stay whole by the inference."""
    result = _verify("gpt_oss", {2: pool2, 4: pool4}[size], size)
    assert _style(result, "model.layers.0.self_attn") == "shard_rows(params=[sinks])"
    assert _style(result, "model.layers.0.self_attn.o_proj") == "rowwise" and not _whole(result)


def _apply_gpt_oss_with_two_heads() -> str:
    from torch.distributed.device_mesh import init_device_mesh

    from tp.testing import models

    model = models.tiny_model("gpt_oss", num_attention_heads=2, num_key_value_heads=2, hidden_size=16, head_dim=8)
    try:
        tp.apply(model, init_device_mesh("cpu", (torch.distributed.get_world_size(),)))
    except tp.TPError as e:
        return f"{type(e).__name__}: {e}"
    return "applied"


def test_no_block_unit_left_refuses_with_the_sizes(pool4):
    """GPT-OSS with 2 heads at TP=4: its attention cannot split, so it would stay whole, and its
    experts stay whole anyway: with only the embedding and lm_head left to shard, tp refuses with
    every size that does not divide (before, a PlanError listed no reason)."""
    for message in pool4.run(_apply_gpt_oss_with_two_heads):
        assert message.startswith("SizeError: cannot shard at tp=4"), message
        assert "model.layers.*.self_attn.sinks: heads: 2 heads of 1 rows do not divide by tp=4" in message


def test_per_head_gate_counts_as_whole_heads(pool2):
    """LFM3's g_proj gives one gate per head (8 outputs, as many as head_dim in the tiny model):
    its shard holds whole heads, so the attention is sharded."""
    result = _verify("lfm3", pool2)
    assert _style(result, "model.layers.2.self_attn.g_proj") == "colwise"
    assert _style(result, "model.layers.2.self_attn.o_proj") == "rowwise"


def test_embedding_scaled_in_place(pool2):
    """CTRL multiplies the embedding's output in place: the vocab-parallel output owns its memory."""
    result = _verify("ctrl", pool2)
    assert _style(result, "transformer.w") == "embedding" and not _whole(result)


def test_embedding_with_its_own_norm_stays_whole():
    """Inkling's embedding normalises its output with a weight of its own: it stays whole."""
    resolved = tp.resolve(tiny_model("inkling2_text"), 2)
    assert "model.embed_tokens" not in resolved.decisions
    assert resolved.decisions["lm_head"].style.name == "lm_head"


def test_split_after_an_elementwise_op(pool2):
    """DBRX clamps its fused qkv before splitting it: the split still gives q/kv parts."""
    result = _verify("dbrx", pool2)
    assert _style(result, "transformer.blocks.0.norm_attn_norm.attn.Wqkv") == "colwise(parts=[q, kv, kv])"


def test_unit_whose_sizes_do_not_divide_stays_whole(pool2):
    """DeepSeek V3.2's indexer key has one head of head_dim features: the attention unit stays
    whole at this TP size and the rest of the plan is used."""
    result = _verify("deepseek_v32", pool2)
    warning, = _whole(result)
    assert "self_attn.o_proj stays whole: at tp=2" in warning and "indexer.wk" in warning
    assert _style(result, "model.layers.0.mlp.down_proj") == "rowwise"


def test_per_layer_head_size_and_embedding_read_outside_it(pool2):
    """Gemma 4: full-attention layers have a larger head than sliding ones, and the multimodal
    model reads its text embedding's weight directly, so the embedding and the lm_head tied to
    it (one unit: a shared weight has one layout) fail their trial and stay whole."""
    result = _verify("gemma4", pool2)
    warnings = "\n".join(_whole(result))
    assert "embedding and lm_head: model.language_model.embed_tokens, lm_head stays whole" in warnings
    assert _style(result, "model.language_model.layers.5.self_attn.k_proj") == "colwise(parts=[kv])"


def test_full_attention_swapped_in_during_the_trace(pool2):
    """BigBird replaces its block-sparse attention with full attention on short inputs: the
    plan follows the blocks as the forward left them."""
    result = _verify("big_bird", pool2)
    assert _style(result, "bert.encoder.layer.0.output.dense") == "rowwise"
    assert _style(result, "cls.predictions.decoder") == "lm_head"


def test_blocks_beside_the_token_embedding():
    """Phi-4-multimodal's tiny audio encoder is larger than its text decoder."""
    with torch.device("meta"):
        model = tiny_model("phi4_multimodal")
    assert find_blocks(model) == ["model.layers.0", "model.layers.1"]


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.layers = nn.ModuleList([nn.Linear(4, 4)])
        self.audio = nn.ModuleDict({"layers": nn.ModuleList([nn.Linear(4, 64), nn.Linear(64, 4)])})

    def get_input_embeddings(self):
        return self.embed


class _NoEmbeddingSaid(_Tiny):
    def get_input_embeddings(self):
        return None


def test_blocks_beside_the_embedding_win_over_larger_lists():
    assert find_blocks(_Tiny()) == ["layers.0"]
    assert find_blocks(_NoEmbeddingSaid()) == ["audio.layers.0", "audio.layers.1"]  # else the largest
