"""Yuan 2.0's two plans against the unsharded model: ``yuan`` (the default) shards the localized
filtering's convolutions, ``yuan_replicate`` keeps the filter whole on every rank.

Tolerances as everywhere: logits 1e-5 absolute, gradients 1e-4 relative. Collectives are counted
with CommDebugMode (tp/testing/counter.py) inside ``tp.verify``; parameter bytes are per rank over
the unsharded model's (the tied embedding counted once), on the registry's tiny Yuan (hidden 64,
8 heads, intermediate 128, vocab 256, 2 layers).
"""

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import tp
import tp.testing.models
from tp.checks.compare import token_ids


def _exact(result):
    assert result.logits_max_abs <= 1e-5, result.table()
    assert result.worst_grad_rel <= 1e-4, result.table()
    assert result.gathered_exact, result.gathered_mismatch
    assert result.collectives_ok, result.table()


def test_a_yuan_model_gets_the_sharded_filter_plan():
    model = tp.testing.models.tiny_model("yuan")
    plan = tp.resolve(model, 4)
    assert plan.family == "yuan"
    styles = {path: d.style for path, d in plan.decisions.items() if ".layers.0.self_attn.lf_gate" in path}
    assert styles["model.layers.0.self_attn.lf_gate.conv1"].name == "colwise"
    assert styles["model.layers.0.self_attn.lf_gate.conv2"].name == "rowwise"
    assert styles["model.layers.0.self_attn.lf_gate.output_layernorm"].name == "replicate"
    assert tp.resolve(model, 4, family="yuan_replicate").decisions[
        "model.layers.0.self_attn.lf_gate"].style.name == "replicate"


@pytest.mark.parametrize("size", [2, 4])
def test_sharded_filter_is_exact_and_costs_one_all_reduce_more_forward(size, pool2, pool4):
    """conv1 on output channels, conv2 on input channels with its bias added once after the
    all-reduce: per layer 3 all-reduces forward (conv2, o_proj, down_proj) and 3 backward (the
    filter's output gradient, the attention input, the MLP input)."""
    result = tp.verify("yuan", tp=size, pool={2: pool2, 4: pool4}[size])
    _exact(result)
    layers = result.blocks
    assert result.forward_collectives == {"all_reduce": 3 * layers + 1, "all_gather": 1}, result.table()
    assert result.backward_collectives == {"all_reduce": 3 * layers + 1}, result.table()
    assert (result.per_block_forward, result.per_block_backward) == (3, 3)
    # conv1's weight and bias and conv2's weight hold 1/tp of the channels; conv2's bias is whole
    assert f"[32, 64, 2, 1] -> [{32 // size}, 64, 2, 1]" in result.report
    assert f"[64, 32, 2, 1] -> [64, {32 // size}, 2, 1]" in result.report
    if size == 4:
        assert result.param_bytes_per_rank / result.param_bytes_unsharded <= 0.26, result.table()


def test_replicated_filter_saves_the_forward_all_reduce_and_pays_in_memory(pool4):
    sharded = tp.verify("yuan", tp=4, pool=pool4)
    replicated = tp.verify("yuan_replicate", tp=4, pool=pool4)
    _exact(replicated)
    assert (replicated.per_block_forward, replicated.per_block_backward) == (2, 3)
    assert replicated.param_bytes_per_rank / replicated.param_bytes_unsharded > 0.35, replicated.table()
    assert sharded.param_bytes_per_rank < replicated.param_bytes_per_rank


def test_eod_reset_attention_is_exact_sharded(pool2):
    """With reset_attention_mask and reset_position_ids the attention is block-causal per
    document; the end-of-document id is one that occurs in the ids tp.verify feeds (seed 0)."""
    model = tp.testing.models.tiny_model("yuan")
    ids = token_ids(model, (2, 16), torch.Generator().manual_seed(1))
    eod = int(ids[0, 6])
    result = tp.verify("yuan", tp=2, pool=pool2, config_overrides={
        "eod_token": eod, "reset_attention_mask": True, "reset_position_ids": True})
    _exact(result)


def test_grouped_filter_is_refused_before_sharding_and_runs_replicated(pool2):
    model = tp.testing.models.tiny_model("yuan", lf_conv2d_group=2)
    with pytest.raises(tp.PlanError, match=r"model\.layers\.0\.self_attn\.lf_gate: .*lf_conv2d_group=2.*yuan_replicate"):
        tp.resolve(model, 2)
    _exact(tp.verify("yuan_replicate", tp=2, pool=pool2, config_overrides={"lf_conv2d_group": 2}))


def _padding_grads_on_rank(pad: int) -> tuple[float, float, float]:
    model = tp.testing.models.tiny_model("yuan", pad_token_id=pad)
    reference = copy.deepcopy(model)
    tp.apply(model, init_device_mesh("cpu", (dist.get_world_size(),)))
    # pad and the first row of each rank's vocabulary shard (0 and 128 of 256)
    ids = torch.tensor([[5, pad, 0, 128, 200, pad, 64, 192], [pad, 7, 129, 1, pad, 130, 250, 3]])
    reference(ids).logits.square().sum().backward()
    model(ids).logits.square().sum().backward()
    weight = model.model.embed_tokens.weight
    grad, expected = tp.full_tensor(weight.grad), reference.model.embed_tokens.weight.grad
    return (grad - expected).abs().max().item() / expected.abs().max().item(), grad[pad].abs().max().item(), \
        expected.abs().max().item()


@pytest.mark.parametrize("pad", [0, 128])
def test_vocab_parallel_embedding_keeps_the_padding_row_without_gradient(pad, pool2):
    """padding_idx is a global row: the rank holding it leaves it without gradient, and the other
    rank's first local row (which has the same local index) still gets its own."""
    for relative, pad_grad, largest in pool2.run(_padding_grads_on_rank, pad):
        assert relative <= 1e-4 and pad_grad == 0 and largest > 0
