"""ALiBi families (Bloom, MPT): each rank's attention gets only its own heads' slice of the bias.

The bias is built once per forward outside the attention, for all heads (Bloom: ``alibi``
of ``[batch * heads, 1, kv]``; MPT: ``position_bias`` of ``[heads, 1, max_seq_len]``). The
``head_input`` style (tp/styles/head_input.py) narrows it in a forward pre-hook on the attention.
"""

import copy

import pytest
import torch
from torch import nn

import tp
from tp.errors import PlanError
from tp.sharding.heads import Heads
from tp.styles import StyleSpec
from tp.styles.head_input import SliceHeadInput


def _check(result):
    assert result.ok, result.table()
    assert result.per_block_forward == 2 and result.per_block_backward == 2, result.table()
    assert "head_input" in result.report


@pytest.mark.parametrize("family", ["bloom", "mpt"])
def test_alibi_family_tp2(family, pool2):
    result = tp.verify(family, tp=2, pool=pool2)
    _check(result)
    assert result.param_bytes_per_rank < result.param_bytes_unsharded


@pytest.mark.parametrize("family", ["bloom", "mpt"])
def test_alibi_family_tp4(family, pool4):
    _check(tp.verify(family, tp=4, pool=pool4))


@pytest.mark.parametrize("family", ["bloom", "mpt"])
def test_twelve_heads_three_per_rank(family, pool4):
    """12 heads is no power of two: both models then interleave two series of slopes, so every
    rank's slice of the bias differs in more than scale."""
    sizes = {"num_attention_heads": 12, "hidden_size": 96, "head_dim": 8}
    _check(tp.verify(family, tp=4, pool=pool4, config_overrides=sizes))


def test_bloom_residual_after_layernorm(pool2):
    """Bloom adds the residual inside attention and MLP, after the row-parallel all-reduce; with
    apply_residual_connection_post_layernorm the residual is the normed block input itself."""
    _check(tp.verify("bloom", tp=2, pool=pool2,
                     config_overrides={"apply_residual_connection_post_layernorm": True}))


# The style alone: its slices, and its hook with a stand-in for a 1-D mesh.

class _Mesh:
    def __init__(self, size, rank):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def get_local_rank(self):
        return self._rank


class _Echo(nn.Module):
    def forward(self, x, bias=None):
        return bias


def test_slices_of_batch_folded_heads_are_each_ranks_heads():
    batch, heads, kv, tp_size = 3, 8, 5, 4
    bias = torch.randn(batch * heads, 1, kv)
    style = SliceHeadInput(kwarg="alibi", heads=heads)
    local = heads // tp_size
    slices = [style._slice(bias, tp_size, r, "test") for r in range(tp_size)]
    for r, piece in enumerate(slices):
        expected = bias.view(batch, heads, 1, kv)[:, r * local:(r + 1) * local].reshape(batch * local, 1, kv)
        assert torch.equal(piece, expected)
    rebuilt = torch.cat([p.view(batch, local, 1, kv) for p in slices], dim=1).reshape_as(bias)
    assert torch.equal(rebuilt, bias)


def test_slices_of_plain_heads():
    bias = torch.randn(8, 1, 7)
    style = SliceHeadInput(kwarg="position_bias")  # heads: the dimension's size
    assert torch.equal(style._slice(bias, 2, 1, "test"), bias[4:])
    assert torch.equal(SliceHeadInput(kwarg="b", head_dim=1)._slice(bias.transpose(0, 1), 4, 3, "t"),
                       bias.transpose(0, 1)[:, 6:])


def test_slice_refuses_what_it_cannot_split():
    with pytest.raises(PlanError, match="split over tp=16"):  # fewer heads than ranks
        SliceHeadInput(kwarg="alibi", heads=8)._slice(torch.zeros(16, 1, 4), 16, 0, "test")
    with pytest.raises(PlanError, match="batch x 8"):
        SliceHeadInput(kwarg="alibi", heads=8)._slice(torch.zeros(12, 1, 4), 2, 0, "test")
    with pytest.raises(PlanError, match="requires a gradient"):
        SliceHeadInput(kwarg="alibi")._slice(torch.zeros(8, 1, 4, requires_grad=True), 2, 0, "test")


def test_slice_follows_a_balanced_head_split():
    """8 heads over 3 ranks, as the projections split them: 3, 3, 2; batch-folded [batch * heads] too."""
    bias = torch.arange(8.0).view(8, 1, 1)
    assert [SliceHeadInput(kwarg="alibi")._slice(bias, 3, rank, "test").flatten().tolist() for rank in range(3)] == \
        [[0, 1, 2], [3, 4, 5], [6, 7]]
    folded = torch.arange(16.0).view(16, 1, 1)  # batch 2 x 8 heads
    assert SliceHeadInput(kwarg="alibi", heads=8)._slice(folded, 3, 2, "test").flatten().tolist() == [6, 7, 14, 15]


def test_hook_slices_keyword_and_positional_and_passes_none():
    module = SliceHeadInput(kwarg="bias", index=1)._apply(_Echo(), _Mesh(2, 1))
    bias, x = torch.arange(8.0).view(8, 1, 1), torch.zeros(1)
    assert torch.equal(module(x, bias=bias), bias[4:])
    assert torch.equal(module(x, bias), bias[4:])
    assert module(x, bias=None) is None
    with pytest.raises(PlanError, match="without keyword 'bias' or a positional argument 1"):
        module(x)


def test_registry_style_takes_query_heads_from_the_model():
    style = StyleSpec.parse({"style": "head_input", "kwarg": "alibi", "index": 2}).build(heads=Heads(16, 4, 8))
    assert isinstance(style, SliceHeadInput) and style.heads == 16 and style.index == 2
    with pytest.raises(ValueError, match="takes no argument heads"):
        StyleSpec.parse({"style": "head_input", "kwarg": "alibi", "heads": 16})


# The style on a real, sharded attention module against the same module unsharded.

def _sharded_attention_rank(kind: str, positional: bool) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

    from tp.styles.layout import ColwiseLayout

    tp_size, rank = dist.get_world_size(), dist.get_rank()
    n_heads, batch, seq = 8, 3, 6
    heads = Heads(n_heads, n_heads, 8)
    torch.manual_seed(0)
    if kind == "bloom":
        from transformers import BloomConfig
        from transformers.models.bloom.modeling_bloom import (
            BloomAttention,
            build_alibi_tensor,
        )

        attn = BloomAttention(BloomConfig(hidden_size=64, n_head=n_heads), layer_idx=0)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[1, :2] = 0  # a left-padded row: its alibi positions start later
        bias = build_alibi_tensor(mask, n_heads, torch.float32)  # [batch * heads, 1, seq]
        causal = torch.full((seq, seq), float("-inf")).triu(1).expand(batch, 1, seq, seq)
        residual = torch.randn(batch, seq, 64)
        plan = {"query_key_value": ColwiseLayout(unit="head", heads=heads), "dense": RowwiseParallel()}
        spec, count = {"kwarg": "alibi", "index": 2}, "num_heads"

        def call(m, x):
            return m(x, residual, bias, causal) if positional else m(x, residual, alibi=bias, attention_mask=causal)
    else:
        from transformers import MptConfig
        from transformers.models.mpt.modeling_mpt import (
            MptAttention,
            build_mpt_alibi_tensor,
        )

        attn = MptAttention(MptConfig(d_model=64, n_heads=n_heads, max_seq_len=seq + 4), layer_idx=0)
        bias = build_mpt_alibi_tensor(n_heads, seq + 4)  # [heads, 1, max_seq_len]
        causal = torch.ones(seq, seq, dtype=torch.bool).triu(1).expand(batch, 1, seq, seq)
        plan = {"Wqkv": ColwiseLayout(parts=("q", "kv", "kv"), heads=heads), "out_proj": RowwiseParallel()}
        spec, count = {"kwarg": "position_bias", "index": 1}, "n_heads"

        def call(m, x):
            return m(x, bias, None, causal) if positional else m(x, position_bias=bias, attention_mask=causal)

    x = torch.randn(batch, seq, 64)
    sharded = copy.deepcopy(attn)
    mesh = init_device_mesh("cpu", (tp_size,))
    parallelize_module(sharded, mesh, StyleSpec.parse({"style": "head_input", **spec}).build(heads=heads))
    parallelize_module(sharded, mesh, plan)
    setattr(sharded, count, n_heads // tp_size)

    ref_out, ref_probs = call(attn, x)
    out, probs = call(sharded, x)
    local = n_heads // tp_size
    return {"out": (out - ref_out).abs().max().item(),
            "probs": (probs - ref_probs[:, rank * local:(rank + 1) * local]).abs().max().item(),
            "shape": tuple(probs.shape)}


@pytest.mark.parametrize("kind", ["bloom", "mpt"])
@pytest.mark.parametrize("positional", [False, True], ids=["keyword", "positional"])
def test_sharded_attention_matches_unsharded_heads(kind, positional, pool4):
    """Each rank's attention probabilities are exactly the unsharded ones of its own heads (so
    each head got its own bias), and the all-reduced output equals the unsharded output."""
    for result in pool4.run(_sharded_attention_rank, kind, positional):
        assert result["shape"] == (3, 2, 6, 6)
        assert result["probs"] <= 1e-6, result
        assert result["out"] <= 1e-5, result
