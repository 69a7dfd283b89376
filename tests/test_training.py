"""Training equivalence: 20 AdamW steps, sharded (TP=2, with and without sequence parallelism)
against the unsharded model with the same seed and batches.

Limits: the loss of every step within 1e-5 relative; the trained parameters, gathered, within
1e-5 absolute. AdamW runs with eps=1e-6: with the default 1e-8, Adam's first step divides
entries whose gradient is itself about 1e-8 (rounding level) by their own magnitude, so a
1e-7 relative difference in such a gradient moves the parameter by up to ~1e-4 (GPT-2's
c_fc: 7e-5 after one step), in the sharded and in any re-ordered unsharded computation alike.
Dropout is off: the sharded model cannot draw the unsharded model's masks (docs/dropout.md).
"""

import pytest

from tp.testing.training import TrainingSpec, compare_training

NO_DROPOUT = {"gpt2": (("resid_pdrop", 0.0), ("embd_pdrop", 0.0), ("attn_pdrop", 0.0))}


def _train(pool, family, sequence_parallel):
    spec = TrainingSpec(family, steps=20, eps=1e-6, apply_kwargs=(("sequence_parallel", sequence_parallel),),
                        config_overrides=NO_DROPOUT.get(family, ()))
    return pool.run(compare_training, spec)


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_twenty_adamw_steps_match_the_unsharded_model(pool2, family, sequence_parallel):
    results = _train(pool2, family, sequence_parallel)
    for r in results:
        reference, sharded = r["losses"]["reference"], r["losses"]["sharded"]
        assert len(sharded) == 20
        for step, (a, b) in enumerate(zip(reference, sharded)):
            assert abs(a - b) <= 1e-5 * abs(a), (step, a, b)
        assert r["worst_param_gap"] <= 1e-5, (r["worst_param"], r["worst_param_gap"])
        # the model really trained: the loss moved
        assert abs(reference[-1] - reference[0]) > 1e-3
    # every rank saw the same losses
    assert len({tuple(r["losses"]["sharded"]) for r in results}) == 1


def test_training_a_family_with_fused_layouts(pool2):
    """phi3's fused qkv and packed gate_up, with sequence parallelism."""
    for r in _train(pool2, "phi3", True):
        assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(r["losses"]["reference"], r["losses"]["sharded"]))
        assert r["worst_param_gap"] <= 1e-5, (r["worst_param"], r["worst_param_gap"])


def test_vocab_parallel_loss_trains_like_the_gathered_one(pool2):
    """loss_parallel: the logits stay vocab-sharded and the cross-entropy runs on the shards."""
    spec = TrainingSpec("llama", steps=10, eps=1e-6,
                        apply_kwargs=(("loss_parallel", True), ("sequence_parallel", True)))
    for r in pool2.run(compare_training, spec):
        assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(r["losses"]["reference"], r["losses"]["sharded"]))
        assert r["worst_param_gap"] <= 1e-5, (r["worst_param"], r["worst_param_gap"])
