"""Every registered family with each config option that changes its forward turned on
(tp/infer/flags.py finds them in the config class): sharded at TP=2 and 4 it matches the
unsharded model, or tp refuses it before it runs. Slow: run with ``pytest --slow``."""

import pytest
import torch

from tp.errors import TPError
from tp.infer.flags import forward_flags
from tp.plan.registry import load_registry
from tp.testing.models import family_config, tiny_model
from tp.testing.verify import VerifyResult, VerifySpec, verify_rank

pytestmark = pytest.mark.slow

REGISTRY = load_registry()
CASES = [(family, flag, value) for family in REGISTRY.families if REGISTRY.inherited(family, "model_types")
         for flag, value in forward_flags(type(family_config(family)))]


def _verify_or_refuse(spec: VerifySpec):
    """A refusal comes back as a value: a task that raises would close the shared pool."""
    try:
        return "ran", verify_rank(spec)
    except TPError as e:
        return "refused", f"{type(e).__name__}: {str(e).splitlines()[0]}"


def _runs_unsharded(family: str, overrides: dict) -> str | None:
    """Why the unsharded tiny model cannot run with ``overrides``, or None."""
    try:
        model = tiny_model(family, **overrides)
        model(input_ids=torch.randint(3, 64, (1, 8)))
    except Exception as e:  # the option needs other settings, or this transformers lacks it
        return f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"
    return None


@pytest.mark.parametrize("tp_size", [2, 4])
@pytest.mark.parametrize("family, flag, value", CASES, ids=[f"{f}-{k}={v}" for f, k, v in CASES])
def test_flag_shards_exactly_or_is_refused(family, flag, value, tp_size, request):
    overrides = {flag: value}
    why_not = _runs_unsharded(family, overrides)
    if why_not:
        pytest.skip(f"the unsharded model does not run with {flag}={value}: {why_not}")
    pool = request.getfixturevalue(f"pool{tp_size}")
    outcome, found = pool.run(_verify_or_refuse, VerifySpec(family, config_overrides=overrides))[0]
    if outcome == "refused":
        assert found.startswith(("SizeError", "PlanError")), found  # refused before it ran, with a reason
        return
    result = VerifyResult(**found)
    assert result.ok, result.table()
