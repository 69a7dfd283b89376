"""Encoder-decoder families with cross-attention (registry.toml: t5, bart, whisper) at TP=2 and TP=4.

Tolerances as in test_families.py: logits max abs diff <= 1e-5, every gradient <= 1e-4 relative,
gathered parameters bit-exact. Collectives, counted with CommDebugMode: Megatron's minimum, in the
forward 2 all-reduces per encoder layer (attention, MLP) and 3 per decoder layer (self-attention,
cross-attention, MLP), one all-reduce per token embedding that runs and one all-gather of the
logits; in the backward the mirror of the layers' all-reduces, one for the encoder output (read
by every cross-attention's k and v) and one for the lm_head input.

The plan report's prediction (``result.expected_forward``) matches: the ``shared`` embedding of
T5 and BART, tied to both stacks' embed_tokens but never run, has no style and takes their
sharded weight, so the report charges it nothing. ``find_blocks`` sees only the decoder layers
as blocks, so the per-block figures of ``VerifyResult`` are per decoder layer, with the encoder layers counted among the collectives
outside the blocks; per-layer counts are measured here with hooks on every layer instead.
"""

import pytest
import torch

import tp
import tp.testing.models

FAMILIES = ("t5", "bart", "whisper")
ENCODER_LAYERS = DECODER_LAYERS = 2  # the tiny models of registry.toml
EMBEDDINGS_RUN = {"t5": 2, "bart": 2, "whisper": 1}  # Whisper's encoder reads features, not tokens


def _forward(family):
    return {"all_reduce": 2 * ENCODER_LAYERS + 3 * DECODER_LAYERS + EMBEDDINGS_RUN[family], "all_gather": 1}


BACKWARD = {"all_reduce": 2 * ENCODER_LAYERS + 3 * DECODER_LAYERS + 2}


def _check(result, family):
    assert result.logits_max_abs <= 1e-5, result.table()
    assert result.worst_grad_rel <= 1e-4, result.table()
    assert result.gathered_exact, result.gathered_mismatch
    assert result.forward_collectives == _forward(family), result.table()
    assert result.backward_collectives == BACKWARD, result.table()
    assert result.first_block_forward == {"all_reduce": 3}  # find_blocks' first block: decoder layer 0
    assert result.expected_forward == sum(_forward(family).values()), result.report
    assert result.collectives_ok, result.table()
    assert result.expected_backward == sum(BACKWARD.values()), result.report
    assert result.param_bytes_per_rank < result.param_bytes_unsharded


@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_matches_unsharded(family, pool2):
    _check(tp.verify(family, tp=2, pool=pool2), family)


@pytest.mark.parametrize("family", FAMILIES)
def test_tp4_matches_unsharded(family, pool4):
    _check(tp.verify(family, tp=4, pool=pool4), family)


def test_t5_gated_feed_forward(pool2):
    """T5 1.1 and Flan-T5 gate the MLP (wi_0, wi_1): both column-parallel, wo row-parallel."""
    result = tp.verify("t5", tp=2, pool=pool2, config_overrides={"feed_forward_proj": "gated-gelu"})
    _check(result, "t5")
    assert "DenseReluDense.wi_0" in result.report and "DenseReluDense.wi_1" in result.report


def _layer_counts(family: str) -> dict:
    """Forward collectives of each encoder and decoder layer, by kind; and whether the tied
    embeddings still share one parameter after sharding."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from tp.checks.compare import model_inputs
    from tp.testing.counter import CollectiveCounter
    from tp.testing.models import tiny_model

    model = tiny_model(family)
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - \
        {name for name, _ in model.named_parameters()}
    tp.apply(model, init_device_mesh("cpu", (dist.get_world_size(),)))
    weights = {id(model.get_submodule(name.rpartition(".")[0]).weight) for name in tied}
    weights.add(id(model.get_input_embeddings().weight))
    counts: dict[str, list] = {}
    with CollectiveCounter() as counter:
        for stack_name, stack in (("encoder", model.get_encoder()), ("decoder", model.get_decoder())):
            layers = getattr(stack, "block", None) or stack.layers
            counts[stack_name] = [None] * len(layers)
            for i, layer in enumerate(layers):
                before = {}

                def start(module, args, before=before):
                    before.update(counter.counts())

                def stop(module, args, output, where=counts[stack_name], i=i, before=before):
                    where[i] = {k: n - before.get(k, 0) for k, n in counter.counts().items() if n > before.get(k, 0)}

                layer.register_forward_pre_hook(start)
                layer.register_forward_hook(stop)
        vocab = model.get_input_embeddings().num_embeddings
        ids = torch.randint(3, vocab, (2, 16), generator=torch.Generator().manual_seed(1))
        model(**model_inputs(model, ids))
    return dict(counts, total=dict(counter.counts()), tied=sorted(tied), one_weight=len(weights) == 1)


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_collectives_per_layer(family, size, pool2, pool4):
    counts = {2: pool2, 4: pool4}[size].run(_layer_counts, family)[0]
    assert counts["encoder"] == [{"all_reduce": 2}] * ENCODER_LAYERS
    assert counts["decoder"] == [{"all_reduce": 3}] * DECODER_LAYERS
    assert counts["total"] == _forward(family)
    # Tied parameters stay tied: T5 and BART share one weight among `shared`, both stacks'
    # embed_tokens and lm_head; Whisper between the decoder's embed_tokens and proj_out.
    assert counts["tied"] and counts["one_weight"], counts["tied"]


def _meta(family: str, **kwargs):
    return tp.testing.models.build(tp.testing.models.family_config(family), device="meta", **kwargs)


def test_recognised_by_their_encoder_decoder_classes():
    """The families claim the encoder-decoder classes; BART's and Whisper's decoder-only causal LMs
    (no encoder output for the cross-attention) keep the plan inferred from their dataflow."""
    reg = tp.load_registry()
    for family in FAMILIES:
        whole = _meta(family, encoder_decoder=True)
        assert whole.config.is_encoder_decoder and reg.family_of(whole) == family
    assert type(_meta("t5")).__name__ == "T5ForConditionalGeneration"  # T5 has no causal LM
    for family in ("bart", "whisper"):
        decoder_only = _meta(family)
        assert type(decoder_only).__name__.endswith("ForCausalLM") and reg.family_of(decoder_only) is None


def test_t5_relative_attention_bias_is_sharded_by_heads():
    model = _meta("t5")
    report = tp.resolve(model, 4)
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias"
    assert report.decisions[bias].style.name == "colwise"  # nn.Embedding [buckets, heads]: dim 1
    assert report.decisions["decoder"].style.args == (("kwarg", "encoder_hidden_states"),)
