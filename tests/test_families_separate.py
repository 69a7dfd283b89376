"""OPT, GPT-J, CodeGen and StableLM: families whose attention keeps q, k and v apart (or packs
them CodeGen's way), at TP=2 and TP=4 against the unsharded model.

* OPT: MLP (fc1/fc2) directly in the decoder layer; lm_head tied to the embedding.
* GPT-J and CodeGen: attention and MLP side by side on one LayerNorm; lm_head has a bias.
* CodeGen: qkv_proj holds mp_num=4 blocks of [q; v; k]: 12 equal parts, split by heads, and
  out_proj reads the heads back in that block order: 4 parts.
* StableLM: GQA; kv heads are replicated when tp > kv heads. Its per-head q/k LayerNorm lists
  (qk_layernorm) run each rank's own heads' norms (per_head_norms; tests/test_stablelm_norms.py).
"""

import pytest
import torch

import tp
import tp.checks.report
import tp.checks.sizes
import tp.testing.models
from tp.sharding.heads import Heads
from tp.styles import StyleSpec


def _check(result, per_block_backward=2):
    table = result.table()
    assert result.logits_max_abs <= 1e-5, table
    assert result.worst_grad_rel <= 1e-4, table
    assert result.gathered_exact, result.gathered_mismatch
    assert result.collectives_ok, table
    assert result.per_block_forward == 2, table
    assert result.per_block_backward == per_block_backward, table
    assert result.ok


FAMILIES = ["opt", "gptj", "codegen", "stablelm"]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_tp2(family, pool2):
    result = tp.verify(family, tp=2, pool=pool2)
    _check(result)
    assert result.family == family
    assert result.param_bytes_per_rank < 0.6 * result.param_bytes_unsharded


@pytest.mark.parametrize("family", FAMILIES)
def test_family_tp4(family, pool4):
    result = tp.verify(family, tp=4, pool=pool4)
    _check(result)
    assert result.param_bytes_per_rank < 0.35 * result.param_bytes_unsharded


def test_stablelm_two_kv_heads_replicated_at_tp4(pool4):
    """8 query heads over 2 kv heads (with q/k/v biases) at TP=4: each kv head is held by two
    ranks, and its weight and bias gradients are summed over those two (4 all-reduces a layer)."""
    sizes = {"num_key_value_heads": 2, "use_qkv_bias": True}
    result = tp.verify("stablelm", tp=4, pool=pool4, config_overrides=sizes)
    _check(result, per_block_backward=2 + 4)


def test_stablelm_qk_layernorm_plans_per_head_norms():
    """The per-head LayerNorm lists get per_head_norms (q heads, kv heads); without them the plan has none."""
    model = tp.testing.models.build(tp.testing.models.family_config("stablelm", qk_layernorm=True), device="meta")
    styles = {path: str(d.style) for path, d in tp.resolve(model, 2).decisions.items() if "layernorm" in path}
    assert styles["model.layers.0.self_attn.q_layernorm"] == "per_head_norms(heads=q)"
    assert styles["model.layers.0.self_attn.k_layernorm"] == "per_head_norms(heads=kv)"
    plain = tp.testing.models.build(tp.testing.models.family_config("stablelm"), device="meta")
    assert not any("per_head_norms" in str(d.style) for d in tp.resolve(plain, 2).decisions.values())


def test_codegen_layouts_follow_its_mp_num_4_split():
    """Rows each rank holds, against CodeGen's own indexing: qkv feature of (block m, part c in
    q/v/k, head j of the block, dim i) is m*3E/4 + c*E/4 + j*d + i; merged heads come back as
    block m, head j, and a rank's local heads are read with num_attention_heads = H/tp."""
    H, d, E = 16, 8, 128
    heads = Heads(H, H, d)
    qkv = StyleSpec.parse({"style": "colwise", "parts": 12, "unit": "head_dim"}).build(
        heads=heads, module=torch.nn.Linear(E, 3 * E, bias=False))
    out = StyleSpec.parse({"style": "rowwise", "parts": 4, "unit": "head"}).build(
        heads=heads, module=torch.nn.Linear(E, E, bias=False))
    qkv_layout = qkv.layouts(torch.nn.Linear(E, 3 * E, bias=False))["weight"][0]
    out_layout = out.layouts(torch.nn.Linear(E, E, bias=False))["weight"][0]
    for world in (2, 4):
        per = H // 4 // world
        for rank in range(world):
            mine = [j for j in range(rank * per, (rank + 1) * per)]
            want_qkv = [m * 3 * E // 4 + c * E // 4 + j * d + i
                        for m in range(4) for c in range(3) for j in mine for i in range(d)]
            want_out = [(m * H // 4 + j) * d + i for m in range(4) for j in mine for i in range(d)]
            assert qkv_layout.rows(world, rank) == want_qkv
            assert out_layout.rows(world, rank) == want_out


def test_codegen_refuses_tp_beyond_a_quarter_of_the_heads():
    """Each mp block holds H/4 heads: 16 heads allow TP 1, 2, 4 and no more."""
    model = tp.testing.models.build(tp.testing.models.family_config("codegen"), device="meta")
    lines, working = tp.checks.sizes.problems(model, tp.resolve(model, 8), 8)
    assert working == [1, 2, 4]
    assert any("qkv_proj" in line and "do not divide by tp=8" in line for line in lines)


@pytest.mark.parametrize("family", ["gptj", "codegen"])
def test_lm_head_bias_is_sharded_with_the_vocab(family):
    model = tp.testing.models.build(tp.testing.models.family_config(family), device="meta")
    report = tp.checks.report.build(model, tp.resolve(model, 2), 2)
    row = next(r for r in report.rows if r.module == "lm_head")
    assert row.style == "lm_head"
    assert "bias [256] -> [128]" in row.shapes
