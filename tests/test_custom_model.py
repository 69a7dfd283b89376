"""A user's own model, registered through a user registry, with per-rank head counts."""

import pytest

import tp
import tp.testing.launch
from tests.toy import TOY_REGISTRY, make_toy


@pytest.fixture
def toy_registry(tmp_path):
    path = tmp_path / "toy.toml"
    path.write_text(TOY_REGISTRY)
    return str(path)


def test_divided_head_counts_make_the_sharded_model_exact(toy_registry, pool2):
    result = tp.verify(model_factory=make_toy, tp=2, pool=pool2, registry=toy_registry)
    assert result.logits_max_abs <= 1e-5 and result.worst_grad_rel <= 1e-4, result.table()
    assert result.gathered_exact and result.collectives_ok
    assert result.per_block_forward == 2 and result.per_block_backward == 2
    assert "family toy" in result.report


def test_without_divide_the_stored_head_count_is_refused_before_sharding(tmp_path, pool2):
    """Leaving out `divide` must be refused (the trial on the model itself hits the shape error),
    never give a wrong result."""
    path = tmp_path / "toy.toml"
    path.write_text(TOY_REGISTRY.replace('divide = ["attn.num_heads"]\n', ""))
    with pytest.raises(tp.PlanError) as err:  # the pool raises a rank's own tp error
        tp.verify(model_factory=make_toy, tp=2, pool=pool2, registry=str(path))
    assert "the plan of family 'toy' does not reproduce the unsharded model" in str(err.value)
    assert "RuntimeError: shape" in str(err.value)
