"""Every registered family's default (published-size) config plans on the meta device at TP=2, 4
and 8: tp.resolve and the size check give a plan or name each size that does not divide, and no
layout fails to build. Tiny models alone cannot show this: their widths may coincide where real
ones differ."""


import pytest

import tp
import tp.checks.sizes
from tp.plan.registry import load_registry
from tp.testing.models import build, encoder_decoder, family_config

FAMILIES = [f for f in load_registry().families if load_registry().inherited(f, "model_types")]


@pytest.mark.parametrize("family", FAMILIES)
def test_published_size_plans_on_meta(family):
    config = family_config(family, tiny=False)
    model = build(config, device="meta", encoder_decoder=encoder_decoder(config, family))
    plan = tp.resolve(model, 2, family=family)
    assert plan.family == family and plan.decisions and not plan.inconsistencies, plan.inconsistencies
    for size in (2, 4, 8):
        lines, working = tp.checks.sizes.problems(model, plan, size)
        assert all(" by tp=" in line or "tp=" in line for line in lines), lines
        assert (not lines) == (size in working)


def test_an_inferred_moe_plans_at_published_size():
    # qwen2_moe: its shared expert is as wide as its kv projections on a tiny twin with equal widths
    model = build(family_config("qwen2_moe", tiny=False), device="meta")
    plan = tp.resolve(model, 2)
    assert plan.family is None and not tp.checks.sizes.problems(model, plan, 2)[0]
    assert str(plan.decisions["model.layers.0.mlp.shared_expert.gate_proj"].style) == "colwise"


def test_a_layout_that_does_not_fit_its_module_is_named(mine_registry, llama_meta):
    registry = mine_registry('"layers.*.mlp.up_proj" = { style = "colwise", parts = ["kv"] }')
    lines, working = tp.checks.sizes.problems(llama_meta, tp.resolve(llama_meta, 2, registry=registry), 2)
    assert lines == ["model.layers.*.mlp.up_proj: colwise(parts=[kv]): Linear (colwise): parts ['kv'] make 32 "
                     "rows (Heads(q=8, kv=4, dim=8)), but the dimension has 128; check the family's parts"]
    assert working == []
