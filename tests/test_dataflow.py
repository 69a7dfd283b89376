"""The dataflow trace (tp/infer/dataflow.py) and the plans inferred from it (tp/infer/inference.py, tp/infer/plan.py),
on tiny transformers models in one process: which linears pair up, what stays whole and why."""

import pytest

import tp
from tp.infer.dataflow import plan_block, trace_blocks
from tp.plan.structure import find_blocks
from tp.testing.census import tiny_model
from tp.trial import trial_inputs


def block_plan(model_type, keep=frozenset()):
    model = tiny_model(model_type)
    blocks = find_blocks(model)
    ids = trial_inputs(model)
    (flow, *_), = [list(trace_blocks(model, blocks[:1], lambda: model(input_ids=ids)).values())]
    plan = plan_block(flow, keep)
    return {u.row: u for u in plan.units}, plan.kept


def test_llama_pairs_attention_and_mlp():
    units, kept = block_plan("llama")
    assert units["self_attn.o_proj"].columns == ("self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj")
    assert units["mlp.down_proj"].columns == ("mlp.gate_proj", "mlp.up_proj")
    assert not kept and not any(u.grad_sums for u in units.values())


def test_parameters_in_the_sharded_region_get_their_gradients_summed():
    units, _ = block_plan("apertus")
    assert units["self_attn.o_proj"].grad_sums == ("self_attn.k_norm.weight", "self_attn.q_norm.weight")
    assert units["mlp.down_proj"].grad_sums == ("mlp.act_fn.alpha_n", "mlp.act_fn.alpha_p")


def test_fused_output_cut_in_parts_is_seen():
    units, _ = block_plan("gpt2")
    assert units["attn.c_proj"].splits == {"attn.c_attn": (64, 64, 64)}


def test_experts_router_and_shared_expert_gate():
    units, kept = block_plan("qwen2_moe")
    assert units["mlp.experts"].columns == ()
    assert units["mlp.shared_expert.down_proj"].columns == ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")
    assert kept["mlp.shared_expert_gate"] == "reads and feeds the residual stream directly"
    assert not any("mlp.gate" in u.members() for u in units.values())  # the router stays whole


def test_state_space_block_has_no_column_row_pair():
    units, kept = block_plan("mamba")
    assert not units
    assert kept["mixer.in_proj"] == "mixer.in_proj feeds more than mixer.out_proj"


def test_inferred_plan_says_where_transformers_plan_agrees():
    model = tiny_model("apertus")
    resolved = tp.resolve(model, 2)
    sources = {p: d.source for p, d in resolved.decisions.items()}
    assert sources["model.layers.0.self_attn.q_proj"] == "transformers plan (dataflow agrees)"
    assert resolved.decisions["model.layers.0.mlp.act_fn"].style.name == "sum_grads"
    # glm's transformers plan gathers the packed gate_up output and repeats the MLP's activation on
    # every rank; the trace sees the output cut in two and shards both halves
    glm = tp.resolve(tiny_model("glm"), 2)
    gate_up = glm.decisions["model.layers.0.mlp.gate_up_proj"]
    assert str(gate_up.style) == "colwise(parts=2)"
    assert gate_up.source == "inferred (dataflow); transformers plan says colwise_gather_output"


def test_model_with_nothing_to_shard_is_refused_with_the_reason():
    with pytest.raises(tp.errors.PlanError, match="no part of its blocks can be sharded safely.*which is not a linear"):
        tp.resolve(tiny_model("zaya"), 2)  # a grouped convolution between qkv_proj and o_proj
