"""Sequence parallelism: activations between blocks sharded along the sequence.

Per layer the forward costs 2 all-gathers (each block input, once) and 2 reduce-scatters (each
row-parallel output), the backward their mirror; the residual stream between blocks holds 1/N
of the unsharded bytes on each rank. A MoE block counts as one block input: its router and
experts read the sequence gathered once, and the experts' partial output is reduce-scattered.
Encoder-decoder families shard both stacks (a decoder layer: 3 all-gathers and 3 reduce-scatters,
self-attention, cross-attention and MLP), and the encoder output is gathered once for the whole
decoder. Same tolerances as test_families.py.
"""

import functools

import pytest
import torch

import tp
import tp.testing.models
from tests.test_families import EXTRA_BACKWARD, FAMILIES

# Yuan's sharded localized filtering all-reduces conv2's output inside attention (registry.toml); a
# Mamba mixer's x_proj all-reduces dt, B and C, which every rank's channels read whole.
INNER_ALL_REDUCES = {"yuan": 1, "mamba": 1, "jamba": 1}
REFUSED = {"opt": "flattens batch and sequence"}
# A Mamba or Mamba-2 layer holds one sub-block, the mixer: its input all-gathered once, out_proj's
# output reduce-scattered. Bamba's mixer (one group, fewer than ranks) gathers its gated norm's input
# and gate too, and its MLP is the second sub-block; so does Zamba2's first layer, a Mamba-2 layer.
FIRST_BLOCK = {"mamba": {"all_gather": 1, "reduce_scatter": 1}, "mamba2": {"all_gather": 1, "reduce_scatter": 1},
               "bamba": {"all_gather": 4, "reduce_scatter": 2}, "zamba2": {"all_gather": 3, "reduce_scatter": 1}}
# The mirror of the mixer's collectives (Mamba: with x_proj's output gradient summed). Zamba2, on
# average over its layers: a Mamba-2 mixer with one group costs 8 (the mirror of its 4, the gradient
# sums of its replicated B and C rows and of its norm), the hybrid layer 1 more (its linear cuts the
# shared block's output along the sequence: the gradient is all-gathered).
BACKWARD_PER_BLOCK = {"mamba": 3, "mamba2": 2, "zamba2": 8}
ENCODER_LAYERS = DECODER_LAYERS = 2  # the tiny models of registry.toml


def _check_family(result, family, size):
    assert result.ok, result.table()
    inner = {"all_reduce": INNER_ALL_REDUCES[family]} if family in INNER_ALL_REDUCES else {}
    expected = FIRST_BLOCK.get(family, {"all_gather": 2, "reduce_scatter": 2})
    assert result.first_block_forward == {**expected, **inner}, result.table()
    assert result.activation_bytes_per_rank * size == result.activation_bytes_unsharded, result.table()
    assert result.per_block_backward == BACKWARD_PER_BLOCK.get(family, 4 + EXTRA_BACKWARD.get(family, 0)), \
        result.table()


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in REFUSED])
def test_family_with_sequence_parallel(family, pool2):
    _check_family(tp.verify(family, tp=2, pool=pool2, sequence_parallel=True), family, 2)


@pytest.mark.slow  # every family once more, at TP=4 (about 4 minutes on 2 cores)
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in REFUSED])
def test_family_with_sequence_parallel_tp4(family, pool4):
    _check_family(tp.verify(family, tp=4, pool=pool4, sequence_parallel=True), family, 4)


def _padded_logits_difference(model_type: str, **config) -> float:
    from torch.distributed.device_mesh import init_device_mesh

    model = tp.testing.models.tiny_model(model_type, **config)
    ids = torch.tensor([[5, 17, 42, 8, 99, 3, 64, 21], [0, 0, 0, 9, 11, 13, 15, 17]])
    mask = (ids != 0).long()  # the second row is padded on the left
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
        tp.apply(model, init_device_mesh("cpu", (torch.distributed.get_world_size(),)), sequence_parallel=True)
        return (model(input_ids=ids, attention_mask=mask).logits - reference).abs().max().item()


def test_mamba2_mixer_gathers_the_sequence_once(pool2, pool4):
    """The mixer's convolution and scan need the whole sequence: its input is all-gathered once and
    out_proj's partial output reduce-scattered; with one group its gated norm gathers its input and
    gate too. A padding mask applies to the gathered sequence, as in the unsharded mixer."""
    result = tp.verify(model_factory=functools.partial(tp.testing.models.tiny_model, "mamba2", n_groups=1), tp=4,
                       pool=pool4, sequence_parallel=True)
    assert result.ok, result.table()
    assert result.first_block_forward == {"all_gather": 3, "reduce_scatter": 1}, result.table()
    assert result.activation_bytes_per_rank * 4 == result.activation_bytes_unsharded, result.table()
    assert max(pool2.run(_padded_logits_difference, "mamba2", n_groups=1)) <= 1e-5


@pytest.mark.parametrize("model_type", ["mamba", "jamba"])
def test_mamba_mixer_masks_the_gathered_sequence(model_type, pool2):
    """A Mamba mixer multiplies its input by the padding mask before in_proj: the mask covers the
    whole sequence, so the mixer gathers its input into a plain tensor first (in_proj reads it
    without summing its gradient again: the gather reduce-scatters it)."""
    assert max(pool2.run(_padded_logits_difference, model_type)) <= 1e-5


def test_zamba2_shared_blocks_read_the_gathered_sequence(pool4):
    """Zamba2's transformer blocks, kept whole and shared by several hybrid layers (two blocks over
    three layers here, with rotary positions), read the stream and the embeddings all-gathered, and
    each hybrid layer's linear cuts the block's output along the sequence again."""
    config = dict(num_hidden_layers=6, layers_block_type=["mamba", "hybrid"] * 3, num_mem_blocks=2,
                  use_mem_rope=True)
    result = tp.verify(model_factory=functools.partial(tp.testing.models.tiny_model, "zamba2", **config), tp=4,
                       pool=pool4, sequence_parallel=True)
    assert result.ok, result.table()
    assert result.activation_bytes_per_rank * 4 == result.activation_bytes_unsharded, result.table()
    plan = tp.resolve(tp.testing.models.tiny_model("zamba2", **config), 4, sequence_parallel=True)
    styles = {path: str(d.style) for path, d in plan.decisions.items()}
    assert styles["model.layers.1.shared_transformer"] == "sequence_gather(kwargs=[original_hidden_states])"
    assert styles["model.layers.1.linear"] == "sequence_shard"
    # the shared block's own norms read its gathered input, not the stream
    assert "model.layers.1.shared_transformer.input_layernorm" not in styles


def test_llama_collectives_and_activation_bytes(pool2, pool4):
    result = tp.verify("llama", tp=2, pool=pool2, sequence_parallel=True)
    blocks = result.blocks
    # + embedding reduce-scatter; + lm_head input and logits all-gathers
    assert result.forward_collectives == {"all_gather": 2 * blocks + 2, "reduce_scatter": 2 * blocks + 1}
    # the mirror: + embedding all-gather; + lm_head input reduce-scatter
    assert result.backward_collectives == {"all_gather": 2 * blocks + 1, "reduce_scatter": 2 * blocks + 1}
    quarter = tp.verify("llama", tp=4, pool=pool4, sequence_parallel=True)
    assert quarter.ok and quarter.activation_bytes_per_rank * 4 == quarter.activation_bytes_unsharded


@pytest.mark.parametrize("size", [2, 4])
def test_mixtral_experts_read_the_sequence_gathered_once(size, pool2, pool4):
    """The MoE block's input is all-gathered once for the router and the experts, and the experts'
    partial output reduce-scattered: the dense layer's 2 + 2 per layer. The backward mirrors it,
    plus the routing weights' gradient (one all-reduce per MoE layer, as without SP)."""
    result = tp.verify("mixtral", tp=size, pool={2: pool2, 4: pool4}[size], sequence_parallel=True)
    assert result.ok, result.table()
    blocks = result.blocks
    assert result.forward_collectives == {"all_gather": 2 * blocks + 2, "reduce_scatter": 2 * blocks + 1}
    assert result.backward_collectives == {"all_gather": 2 * blocks + 1, "reduce_scatter": 2 * blocks + 1,
                                           "all_reduce": blocks}
    assert result.activation_bytes_per_rank * size == result.activation_bytes_unsharded, result.table()


def test_moe_plan_gathers_the_block_once():
    plan = tp.resolve(tp.testing.models.tiny_model("mixtral"), 2, sequence_parallel=True)
    styles = {path: str(d.style) for path, d in plan.decisions.items()}
    assert styles["model.layers.0.mlp"] == "sequence_block(partial_output=True, sequence_dim=1)"
    assert styles["model.layers.0.mlp.experts"] == "experts(sequence_dim=1)"
    assert styles["model.layers.0.mlp.gate"] == "keep"
    assert styles["model.layers.0.post_attention_layernorm"] == "sequence_parallel"
    without = tp.resolve(tp.testing.models.tiny_model("mixtral"), 2)
    assert "model.layers.0.mlp" not in without.decisions
    assert str(without.decisions["model.layers.0.mlp.experts"].style) == "experts"


@pytest.mark.slow  # the inferred plan is traced and tried first (about 100 s on 2 cores)
def test_shared_expert_beside_the_experts(pool2):
    """Qwen2-MoE (plan inferred) adds a sharded shared expert to the experts' output inside the MoE
    block: both all-reduce their outputs and the block cuts the complete sum along the sequence."""
    result = tp.verify("qwen2_moe", tp=2, pool=pool2, sequence_parallel=True)
    assert result.ok, result.table()
    assert result.first_block_forward == {"all_gather": 2, "reduce_scatter": 1, "all_reduce": 2}, result.table()
    assert result.activation_bytes_per_rank * 2 == result.activation_bytes_unsharded, result.table()
    assert "sequence_block(partial_output=False, sequence_dim=1)" in result.report


def _encoder_decoder_counts(family):
    """Forward and backward collectives of a tiny encoder-decoder under sequence parallelism.

    Forward: 2 all-gathers and 2 reduce-scatters per encoder layer, 3 and 3 per decoder layer; one
    all-gather of the encoder output for all cross-attentions; the lm_head's input and logits
    gathered; each token embedding that runs reduce-scattered (BART scales its lookup inside the
    embedding module, on the masked partial sums, so DTensor all-reduces it first and the sync
    point only cuts it). Backward: the mirror, with the encoder output's gradient
    reduce-scattered once; every module cut along the sequence (BART's learned positions and its
    all-reduced embeddings, Whisper's conv2 and decoder positions; not Whisper's frozen encoder
    positions) all-gathers its output gradient."""
    layers_ag = 2 * ENCODER_LAYERS + 3 * DECODER_LAYERS
    embeddings = {"t5": 2, "bart": 0, "whisper": 1}[family]
    forward = {"all_gather": layers_ag + 3, "reduce_scatter": layers_ag + embeddings}
    if family == "bart":
        forward["all_reduce"] = 2
    cut = {"t5": 0, "bart": 4, "whisper": 2}[family]
    backward = {"all_gather": layers_ag + embeddings + cut, "reduce_scatter": layers_ag + 2}
    return forward, backward


@pytest.mark.parametrize("family", ["t5", "bart", "whisper"])
def test_encoder_decoder_with_sequence_parallel(family, pool2):
    result = tp.verify(family, tp=2, pool=pool2, sequence_parallel=True)
    assert result.ok, result.table()
    forward, backward = _encoder_decoder_counts(family)
    assert (result.forward_collectives, result.backward_collectives) == (forward, backward), result.table()
    # find_blocks sees the decoder layers: self-attention, cross-attention and MLP
    assert result.first_block_forward == {"all_gather": 3, "reduce_scatter": 3}, result.table()
    assert result.activation_bytes_per_rank * 2 == result.activation_bytes_unsharded, result.table()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["t5", "bart", "whisper"])
def test_encoder_decoder_with_sequence_parallel_tp4(family, pool4):
    result = tp.verify(family, tp=4, pool=pool4, sequence_parallel=True)
    assert result.ok, result.table()
    assert (result.forward_collectives, result.backward_collectives) == _encoder_decoder_counts(family)
    assert result.activation_bytes_per_rank * 4 == result.activation_bytes_unsharded, result.table()


def test_encoder_stack_is_sharded_too():
    """Both stacks' norms run on sequence shards; the decoder's block input gathers the encoder
    output once; BART's fc1, alone in its layer, gathers its own input."""
    plan = tp.resolve(tp.testing.models.tiny_model("bart"), 2, sequence_parallel=True)
    styles = {path: str(d.style) for path, d in plan.decisions.items()}
    for stack in ("encoder", "decoder"):
        assert styles[f"model.{stack}.layers.0.self_attn_layer_norm"] == "sequence_parallel"
        assert styles[f"model.{stack}.layernorm_embedding"] == "sequence_parallel"
        assert styles[f"model.{stack}.layers.0.fc1"] == "sequence_colwise"
        assert styles[f"model.{stack}.layers.0.fc2"] == "rowwise(sequence_dim=1)"
        assert styles[f"model.{stack}.embed_positions"] == "sequence_shard"
    assert styles["model.decoder"] == "block_input(kwarg=encoder_hidden_states)"
    t5 = tp.resolve(tp.testing.models.tiny_model("t5"), 2, sequence_parallel=True)
    assert str(t5.decisions["encoder.block.0.layer.0.layer_norm"].style) == "sequence_parallel"
    assert str(t5.decisions["decoder.final_layer_norm"].style) == "sequence_parallel"


@pytest.mark.filterwarnings("ignore:family 'mine'")  # llama's MLP patterns match nothing in Mixtral
def test_flattening_module_under_another_style_is_refused(mine_registry):
    """Packed experts need their parent to gather the sequence; a parent styled otherwise is refused."""
    path = mine_registry("""
        "layers.*.mlp.gate" = "keep"
        "layers.*.mlp.experts" = "experts"
        "layers.*.mlp" = "keep"
        """)
    model = tp.testing.models.tiny_model("mixtral")
    with pytest.raises(tp.PlanError, match="sees the tokens flattened"):
        tp.resolve(model, 2, registry=path, family="mine", sequence_parallel=True)


def test_without_sequence_parallel_activations_stay_whole(pool2):
    result = tp.verify("llama", tp=2, pool=pool2)
    assert result.activation_bytes_per_rank == result.activation_bytes_unsharded


def test_plan_shows_the_sync_points():
    model = tp.testing.models.tiny_model("gpt2")
    plan = tp.resolve(model, 2, sequence_parallel=True)
    wpe = plan.decisions["transformer.wpe"]
    assert (str(wpe.style), wpe.source) == ("sequence_shard", "family gpt2 (sequence parallel)")
    assert str(plan.decisions["transformer.h.0.ln_1"].style) == "sequence_parallel"
    assert plan.decisions["transformer.ln_f"].source == "derived (sequence parallel)"
    assert str(plan.decisions["transformer.h.0.attn.c_proj"].style) == "rowwise(sequence_dim=1)"
    assert str(plan.decisions["lm_head"].style) == "lm_head(sequence_dim=1)"


@pytest.mark.parametrize("family, words", REFUSED.items())
def test_refused_families_say_why(family, words):
    model = tp.testing.models.tiny_model(family)
    with pytest.raises(tp.PlanError, match=words):
        tp.resolve(model, 2, sequence_parallel=True)
    tp.resolve(model, 2)  # tensor parallelism alone is fine


def test_registry_sync_points_are_validated(mine_registry, llama_meta):
    path = mine_registry('"model.embed_tokens" = { style = "sequence_shard", sequence_dim = "one" }',
                         "sequence_parallel")
    with pytest.raises(tp.RegistryError):
        tp.resolve(llama_meta, 2, registry=path, sequence_parallel=True)
    path = mine_registry("""
        "model.rotary_emb" = "sequence_shard"
        "layers.*.nothing_here" = "sequence_shard"
        """, "sequence_parallel")
    with pytest.warns(UserWarning, match="'layers.\\*.nothing_here' matches no module"):
        plan = tp.resolve(llama_meta, 2, registry=path, sequence_parallel=True)
    assert plan.decisions["model.rotary_emb"].style.name == "sequence_shard"
