"""Every registered family with each config option that changes its forward turned on
(tp/infer/flags.py finds them in the config class): sharded at TP=2 and 4 it matches the
unsharded model, or tp refuses it before it runs. Slow: run with ``pytest --slow``. The census
runs the same cases (tp/testing/flag_sweep.py) for docs/coverage.md."""

import pytest

from tp.testing.flag_sweep import cases, families, run_case

pytestmark = pytest.mark.slow

CASES = [(family, flag, value) for family in families() for flag, value in cases(family)]


@pytest.mark.parametrize("tp_size", [2, 4])
@pytest.mark.parametrize("family, flag, value", CASES, ids=[f"{f}-{k}={v}" for f, k, v in CASES])
def test_flag_shards_exactly_or_is_refused(family, flag, value, tp_size, request):
    case = run_case(family, flag, value, request.getfixturevalue(f"pool{tp_size}"))
    if case.outcome == "skipped":
        pytest.skip(f"{flag}={value}: {case.reason}")
    if case.outcome == "refused":
        assert case.reason.startswith(("SizeError", "PlanError")), case.reason  # refused before it ran, with a reason
        return
    assert case.outcome == "verified", case.reason
