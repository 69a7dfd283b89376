"""The user's own training loop on a sharded model: torch's AdamW with ``foreach`` (its default on
GPUs) or ``fused``, and ``torch.nn.utils.clip_grad_norm_`` over all parameters, unchanged.

Every parameter of a sharded model is a DTensor (whole ones replicated, tp/sharding/whole.py), so
these utilities take them in one call, and a gradient norm counts every value once.

Limits, as in tests/test_training.py: the loss of every step within 1e-5 relative, the gradient
norm before clipping within 1e-5 relative, the trained parameters (gathered) within 1e-5 absolute.
max_norm=1.0 clips every step of these runs (their norms are about 2.5), so clipping is exercised.
"""

import pytest

from tp.testing.training import TrainingSpec, compare_training

FAMILIES = ["llama", "phi3", "gpt2", "falcon", "yuan"]
NO_DROPOUT = {"gpt2": (("resid_pdrop", 0.0), ("embd_pdrop", 0.0), ("attn_pdrop", 0.0))}


def _check(results, steps):
    for r in results:
        for kind in ("losses", "norms"):
            reference, sharded = r[kind]["reference"], r[kind]["sharded"]
            assert len(sharded) == steps
            for step, (a, b) in enumerate(zip(reference, sharded)):
                assert abs(a - b) <= 1e-5 * abs(a), (kind, step, a, b)
        assert min(r["norms"]["reference"]) > 1.0  # every step clipped
        assert r["worst_param_gap"] <= 1e-5, (r["worst_param"], r["worst_param_gap"])
    assert len({tuple(r["norms"]["sharded"]) for r in results}) == 1  # every rank clipped alike


def _spec(family, optimizer, steps):
    return TrainingSpec(family, steps=steps, eps=1e-6, clip=1.0, optimizer=optimizer,
                        config_overrides=NO_DROPOUT.get(family, ()))


@pytest.mark.parametrize("family", FAMILIES)
def test_foreach_adamw_and_clipping_at_tp2(pool2, family):
    _check(pool2.run(compare_training, _spec(family, (("foreach", True),), 20)), 20)


@pytest.mark.parametrize("family", FAMILIES)
def test_foreach_adamw_and_clipping_at_tp4(pool4, family):
    _check(pool4.run(compare_training, _spec(family, (("foreach", True),), 10)), 10)


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_fused_adamw_and_clipping(pool2, family):
    _check(pool2.run(compare_training, _spec(family, (("fused", True),), 10)), 10)
