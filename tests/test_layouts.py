"""Layouts of fused, packed and replicated weights, and the column/row styles built on them.

Each style is checked against the plain module (nn.Linear, GPT-2's Conv1D) forward and
backward: outputs max abs diff <= 1e-5, input and parameter gradients relative <= 1e-4,
gathered parameters bit-exact. Model-level checks (families) live in test_families*.py.
"""

import copy

import pytest
import torch
from torch import nn
from torch.distributed.tensor import Shard
from torch.distributed.tensor.placement_types import _StridedShard

import tp
import tp.checks.sizes
import tp.testing.launch
import tp.testing.models
from tp.errors import PlanError
from tp.sharding.heads import Heads
from tp.sharding.layouts import Layout, Part
from tp.styles.layout import ColwiseLayout, RowwiseLayout, build_layout

GQA = Heads(q=8, kv=2, dim=4)


def test_fused_qkv_rows_follow_each_part():
    qkv = build_layout(48, parts=["q", "kv", "kv"], unit="row", heads=GQA, where="qkv")
    # tp=2: q heads 0-3, k head 0, v head 0 on rank 0
    assert qkv.rows(2, 0) == [*range(16), *range(32, 36), *range(40, 44)]
    assert qkv.rows(2, 1) == [*range(16, 32), *range(36, 40), *range(44, 48)]
    # tp=4 > 2 kv heads: ranks 0-1 share kv head 0, ranks 2-3 kv head 1
    assert qkv.rows(4, 1) == [*range(8, 16), *range(32, 36), *range(40, 44)]
    assert qkv.rows(4, 2) == [*range(16, 24), *range(36, 40), *range(44, 48)]
    assert qkv.repeats_rows(4) and not qkv.repeats_rows(2)
    assert qkv.placement(0, 2) is None and qkv.placement(0, 4) is None  # unequal parts, replicas


def test_placements_describe_the_layout_when_they_can():
    assert build_layout(16, parts=1, unit="row", heads=None, where="x").placement(0, 2) == Shard(0)
    gate_up = build_layout(16, parts=2, unit="row", heads=None, where="x")
    assert gate_up.placement(1, 4) == _StridedShard(1, split_factor=2)
    assert gate_up.rows(2, 1) == [4, 5, 6, 7, 12, 13, 14, 15]
    mha = build_layout(24, parts=["q", "kv", "kv"], unit="row", heads=Heads(2, 2, 4), where="x")
    assert mha.placement(0, 2) == _StridedShard(0, split_factor=3)
    # one kv head replicated over two ranks has no placement on a 1-D mesh
    assert build_layout(8, parts=["kv"], unit="row", heads=Heads(4, 1, 8), where="x").placement(0, 2) is None


def test_layout_problems_say_what_does_not_split():
    qkv = Layout((Part(12, 8, name="q heads", unit="heads"), Part(4, 8, True, "kv heads", "heads"),
                  Part(4, 8, True, "kv heads", "heads")))
    assert qkv.problems(4) == []
    assert qkv.problems(8) == ["q heads: 12 heads of 8 rows do not divide by tp=8"]
    assert "kv heads: 4 heads of 8 rows do not divide by tp=3 nor does tp divide by it" in qkv.problems(3)[0]
    packed = Layout(tuple(Part(3, 4, name=f"part {i}", unit="head_dim blocks") for i in range(12)))
    assert packed.problems(2) == ["each of 12 equal parts: 3 head_dim blocks of 4 rows do not divide by tp=2"]


@pytest.mark.parametrize("parts, unit, message", [
    (["q", "kv"], "row", "make 40 rows"),
    (5, "row", "do not split into 5 parts"),
    (2, "cube", "unknown unit 'cube'"),
])
def test_layout_errors_name_the_mismatch(parts, unit, message):
    with pytest.raises(PlanError, match=message):
        build_layout(48, parts=parts, unit=unit, heads=GQA, where="qkv_proj")


def test_style_arguments_are_checked_when_the_registry_is_read():
    from tp.styles import StyleSpec

    assert str(StyleSpec.parse({"style": "colwise", "parts": ["q", "kv", "kv"]})) == "colwise(parts=[q, kv, kv])"
    with pytest.raises(ValueError, match="parts must be a number or a list of 'q' and 'kv'"):
        StyleSpec.parse({"style": "colwise", "parts": ["q", "v"]})
    with pytest.raises(ValueError, match="unit must be one of row, head, head_dim, group"):
        StyleSpec.parse({"style": "rowwise", "parts": 2, "unit": "heads"})


class FusedAttentionProjections(nn.Module):
    """A fused qkv linear feeding an output linear through a per-feature nonlinearity."""

    def __init__(self, linear=nn.Linear, heads=GQA, hidden=16):
        super().__init__()
        fused = (heads.q + 2 * heads.kv) * heads.dim
        self.qkv = linear(hidden, fused) if linear is nn.Linear else linear(fused, hidden)
        q_features = heads.q * heads.dim
        self.out = linear(q_features, hidden) if linear is nn.Linear else linear(hidden, q_features)

    def forward(self, x):
        q, k, v = self.qkv(x).split([GQA.q * GQA.dim, GQA.kv * GQA.dim, GQA.kv * GQA.dim], dim=-1)
        # every q head meets its own kv head, as grouped-query attention pairs them
        group = GQA.q // GQA.kv
        k = k.unflatten(-1, (GQA.kv, GQA.dim)).repeat_interleave(group, dim=-2).flatten(-2)
        v = v.unflatten(-1, (GQA.kv, GQA.dim)).repeat_interleave(group, dim=-2).flatten(-2)
        return self.out(torch.tanh(q * k) + v)


def _fused_on_rank(linear_kind: str) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    from transformers.pytorch_utils import Conv1D

    world = dist.get_world_size()
    torch.manual_seed(0)
    reference = FusedAttentionProjections(Conv1D if linear_kind == "conv1d" else nn.Linear)
    model = copy.deepcopy(reference)
    mesh = init_device_mesh("cpu", (world,))
    # each rank's local q/k/v heads must line up: the local forward splits by local sizes
    local = GQA.local(world)
    plan = {"qkv": ColwiseLayout(parts=["q", "kv", "kv"], heads=GQA), "out": RowwiseLayout()}
    parallelize_module(model, mesh, plan)

    def local_forward(x):  # the same module code, on this rank's heads
        q, k, v = model.qkv(x).split([local.q * GQA.dim, local.kv * GQA.dim, local.kv * GQA.dim], dim=-1)
        group = local.q // local.kv
        k = k.unflatten(-1, (local.kv, GQA.dim)).repeat_interleave(group, dim=-2).flatten(-2)
        v = v.unflatten(-1, (local.kv, GQA.dim)).repeat_interleave(group, dim=-2).flatten(-2)
        return model.out(torch.tanh(q * k) + v)

    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    x_ref, x_tp = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref_out = reference(x_ref)
    ref_out.square().sum().backward()
    out = local_forward(x_tp)
    out.square().sum().backward()
    grads = tp.full_parameters(model, grads=True)
    ref_grads = dict(reference.named_parameters())
    return {
        "out": (out - ref_out).abs().max().item(),
        "input_grad": ((x_tp.grad - x_ref.grad).abs().max() / x_ref.grad.abs().max()).item(),
        "grads": {n: ((g - ref_grads[n].grad).abs().max() / ref_grads[n].grad.abs().max()).item()
                  for n, g in grads.items()},
        "exact": all(torch.equal(p, ref_grads[n].detach()) for n, p in tp.full_parameters(model).items()),
        "parts": [(type(p.placements[0]).__name__, tuple(p.to_local().shape))
                  for n, p in model.qkv.named_parameters() if n.startswith("weight_part")],
    }


@pytest.mark.parametrize("linear_kind", ["linear", "conv1d"])
@pytest.mark.parametrize("pool_name", ["pool2", "pool4"])
def test_fused_gqa_qkv_matches_the_plain_module(pool_name, linear_kind, request):
    """tp=2 splits the 2 kv heads; tp=4 replicates them and sums their gradients over replicas."""
    results = request.getfixturevalue(pool_name).run(_fused_on_rank, linear_kind)
    for r in results:
        assert r["out"] <= 1e-5 and r["input_grad"] <= 1e-4, r
        assert max(r["grads"].values()) <= 1e-4, r
        assert r["exact"], r
    # the fused weight is stored as its q, k and v parts: at tp=2 each sharded, at tp=4 the q heads
    # sharded and the k and v heads (2 of them, fewer than the ranks) whole on every rank
    def shape(rows):
        return (rows, 16) if linear_kind == "linear" else (16, rows)

    q_rows, kv_rows = 32 // len(results), 8 // len(results) if len(results) == 2 else 8
    kv_kind = "Shard" if len(results) == 2 else "Replicate"
    assert results[0]["parts"] == [("Shard", shape(q_rows)), (kv_kind, shape(kv_rows)), (kv_kind, shape(kv_rows))]


def test_gqa_with_more_ranks_than_kv_heads(pool4):
    """2 kv heads at tp=4: each kv head is replicated on 2 ranks, gradients summed."""
    # each replicated parameter of a layer sums its gradient once: k and v weights (llama,
    # mixtral, whose routing weights add one more), their biases too (starcoder2), the fused qkv (phi3)
    extra = {"llama": 2, "phi3": 1, "starcoder2": 4, "mixtral": 3}
    for family in extra:
        result = tp.verify(family, tp=4, pool=pool4, config_overrides={"num_key_value_heads": 2})
        assert result.ok, result.table()
        assert result.per_block_forward == 2 and result.per_block_backward == 2 + extra[family], result.table()


def test_uneven_vocabulary_is_exact(pool2):
    """A vocabulary of 32001 (a pad token added) shards as 16001 + 16000 rows, exactly."""
    result = tp.verify("llama", tp=2, pool=pool2, config_overrides={"vocab_size": 32001})
    assert result.ok, result.table()
    assert "[32001, 64] -> [16001, 64]" in result.report


def test_yuan_needs_twice_as_many_heads_as_ranks():
    """Yuan's v/o halves put H/2 heads per half on the ranks: H % (2 tp) == 0, else a clear refusal."""
    model = tp.testing.models.tiny_model("yuan", num_attention_heads=12, hidden_size=96, intermediate_size=192)
    tp.checks.sizes.check(model, tp.resolve(model, 3), 3)  # 12 % 6 == 0
    with pytest.raises(tp.SizeError, match=r"v_proj.weight: each of 2 equal parts: 6 heads of 8 rows do not divide by tp=4"):
        tp.checks.sizes.check(model, tp.resolve(model, 4), 4)


def test_yuan_at_tp3_with_sizes_the_registry_does_not_use():
    with tp.testing.launch.WorkerPool(3) as pool:
        result = tp.verify("yuan", tp=3, pool=pool, config_overrides={
            "num_attention_heads": 12, "hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 3,
            "vocab_size": 300})
    assert result.ok, result.table()
    assert result.per_block_forward == 3  # o_proj, down_proj and the sharded filter's conv2


def _gathered_after_to(family: str) -> bool:
    """phi3's fused qkv_proj and gate_up_proj are stored in parts; after ``model.to()`` replaces the
    Parameter objects, the full state dict still joins them, and the model still computes with them."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    model = tp.testing.models.tiny_model(family)
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    tp.apply(model, init_device_mesh("cpu", (dist.get_world_size(),)))
    ids = torch.randint(3, 200, (2, 6), generator=torch.Generator().manual_seed(0))
    before = model(ids).logits
    model.to(torch.float64).to(torch.float32)  # new Parameter objects: the parts are no longer views of one buffer
    full = tp.full_state_dict(model)
    return all(torch.equal(full[name], value) for name, value in original.items()) and torch.equal(model(ids).logits, before)


def test_full_state_dict_is_exact_after_model_to(pool2):
    assert pool2.run(_gathered_after_to, "phi3") == [True, True]
