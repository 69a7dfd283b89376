"""Every registered family, sharded at TP=2 and TP=4, matches the unsharded model.

Tolerances (float32, same seed): logits max abs diff <= 1e-5; every parameter's gradient
max abs diff <= 1e-4 of that gradient's largest entry (but at least 1e-3 of the model's
largest gradient entry, for gradients that are zero in exact arithmetic); gathered
parameters bit-exact.
Collectives are counted with CommDebugMode and must equal what the plan predicts, which is
at most 2 per decoder layer in each direction.
"""

import functools

import pytest

import tp
import tp.checks.sizes
import tp.testing.models

# Families of language models (the convolutional example is tested in test_conv.py; the
# encoder-decoder families t5, bart and whisper, which name classes and cost 3 all-reduces per
# decoder layer, in test_encoder_decoder.py).
FAMILIES = sorted(name for name, f in tp.load_registry().families.items() if f.model_types)

# Yuan's localized filtering sums its output's partial gradient once more in the backward, and
# with its convolutions sharded (family yuan, not yuan_replicate) all-reduces conv2's output in the
# forward (registry.toml). Mixtral's packed experts
# sum the routing weights' gradient for the router (tp/styles/experts.py). Jamba's Mamba layers sum the
# gradients of the norms on dt, B and C (3) and its MoE layers the routing weights'.
EXTRA_BACKWARD = {"yuan": 1, "yuan_replicate": 1, "mixtral": 1, "jamba": 3, "bamba": 3, "zamba2": 5}
# Bamba's and Zamba2's Mamba-2 mixers have one group: the gated norm gathers its input and gate
# (tp/mamba2.py), and the backward sums the replicated B/C rows' and the norm's gradients.
EXTRA_FORWARD = {"bamba": 1, "zamba2": 1, "yuan": 1}


def _check(result, family=None):
    assert result.logits_max_abs <= 1e-5, result.table()
    assert result.worst_grad_rel <= 1e-4, result.table()
    assert result.gathered_exact, result.gathered_mismatch
    assert result.collectives_ok, result.table()
    assert 1 <= result.per_block_forward <= 2 + EXTRA_FORWARD.get(family, 0), result.table()
    assert 1 <= result.per_block_backward <= 2 + EXTRA_BACKWARD.get(family, 0), result.table()
    assert result.ok


@pytest.mark.parametrize("family", FAMILIES)
def test_family_tp2(family, pool2):
    result = tp.verify(family, tp=2, pool=pool2)
    _check(result, family)
    assert result.param_bytes_per_rank < result.param_bytes_unsharded


@pytest.mark.parametrize("family", FAMILIES)
def test_family_tp4(family, pool4):
    _check(tp.verify(family, tp=4, pool=pool4), family)


def test_dense_families_cost_two_all_reduces_per_layer(pool2):
    """Megatron's minimum: one all-reduce after attention and one after the MLP, forward and
    backward; plus the embedding's all-reduce and the logits' all-gather in the forward, and
    the lm_head input's all-reduce in the backward."""
    result = tp.verify("llama", tp=2, pool=pool2)
    assert result.per_block_forward == 2 and result.per_block_backward == 2
    assert result.forward_collectives == {"all_reduce": 2 * result.blocks + 1, "all_gather": 1}
    assert result.backward_collectives == {"all_reduce": 2 * result.blocks + 1}


def test_other_sizes_than_the_registry_tiny_config(pool2, pool4):
    """Sizes the registry's tiny config does not use: 3 layers, 12 heads of 16, 4 kv heads."""
    sizes = dict(hidden_size=192, num_attention_heads=12, num_key_value_heads=4, head_dim=16,
                 intermediate_size=320, num_hidden_layers=3, vocab_size=384)
    _check(tp.verify("qwen3", tp=2, pool=pool2, config_overrides=sizes))
    _check(tp.verify("mistral", tp=4, pool=pool4, config_overrides=sizes))


def test_cohere_per_head_qk_norms(pool2, pool4):
    """With use_qk_norm, Cohere's q/k LayerNorms hold a weight row per head (plans/cohere.py), sharded
    with the heads; 6 heads at TP=4 split balanced (2, 2, 1, 1), the norms' rows stored whole with
    the projections (one backward all-reduce each)."""
    result = tp.verify("cohere", tp=2, pool=pool2, config_overrides={"use_qk_norm": True})
    _check(result)
    assert "shard_rows" in result.report
    six = dict(use_qk_norm=True, num_attention_heads=6, num_key_value_heads=6, hidden_size=48, head_dim=8)
    balanced = tp.verify("cohere", tp=4, pool=pool4, config_overrides=six)
    assert balanced.ok, balanced.table()
    assert (balanced.per_block_forward, balanced.per_block_backward) == (2, 2 + 6), balanced.table()


@pytest.mark.parametrize("model_type", ["phi", "helium"])
def test_unregistered_decoder_gets_an_inferred_plan(model_type, pool2):
    """No family claims these model types: AutoTP's rule infers the plan, and it is exact."""
    assert model_type not in {t for f in tp.load_registry().families.values() for t in f.model_types}
    result = tp.verify(model_type, tp=2, pool=pool2)
    _check(result)
    assert "inferred" in result.report
    assert result.per_block_forward == 2 and result.per_block_backward == 2


def test_falcon_mamba_shares_the_mamba_family(pool2):
    """Falcon-Mamba's mixer adds weightless norms on dt, B and C, which run on the whole values."""
    from tp.testing.census import tiny_model

    result = tp.verify(model_factory=functools.partial(tiny_model, "falcon_mamba"), tp=2, pool=pool2)
    _check(result)
    assert result.family == "mamba" and (result.per_block_forward, result.per_block_backward) == (2, 2)


@pytest.mark.parametrize("size", [2, 4])
def test_mamba2_with_one_group_for_all_heads(size, pool2, pool4):
    """Most Mamba-2 checkpoints have one group: every rank holds its B and C (gradients summed)
    and the gated norm, whose group spans the ranks, runs on gathered channels."""
    result = tp.verify("mamba2", tp=size, pool={2: pool2, 4: pool4}[size], config_overrides={"n_groups": 1})
    assert result.ok, result.table()
    # forward: out_proj's all-reduce, the norm's input and gate all-gathered; backward: in_proj's
    # input, the two reduce-scatters, the norm's weight, in_proj's and conv1d's replicated rows
    assert (result.per_block_forward, result.per_block_backward) == (3, 7), result.table()


def test_mamba2_heads_that_do_not_divide_are_refused_before_sharding():
    model = tp.testing.models.build(tp.testing.models.family_config("mamba2"), device="meta")
    problems, working = tp.checks.sizes.problems(model, tp.resolve(model, 3), 3)
    assert any("x heads: 16 heads of 8 rows do not divide by tp=3" in p for p in problems), problems
    assert working == [1, 2, 4, 8, 16]


def test_torch_dcp_reshards_a_mamba_mixer(pool2, pool4, tmp_path):
    """The mamba_mixer style's layouts ([x | gate] in in_proj, channels in conv1d, dt_proj, A_log,
    D, x_proj and out_proj) are what torch's DCP reads: saved at TP=4, loaded at TP=2 bit for bit."""
    from tp.testing import torch_dcp

    path, saved = str(tmp_path / "dcp"), functools.partial(tp.testing.models.tiny_model, "jamba")
    pool4.run(torch_dcp.save, saved, path)
    other = functools.partial(tp.testing.models.tiny_model, "jamba", seed=1)
    assert pool2.run(torch_dcp.mismatches, other, saved, path) == [[]] * 2
