"""The flag sweep: a registered family's tiny model with one config option that changes its
forward turned on (``tp/infer/flags.py`` finds them in the config class: QKV clipping, biases,
q/k norms, sliding windows, soft-capping, multipliers, ...), sharded and compared with the
unsharded model. Each case shards exactly, or tp refuses it before it runs; a case whose
unsharded model does not run with the option is skipped with the reason.

The slow test (tests/test_config_sweep.py) and the census (``python -m tp census``, its table
of the published configs' flags) run the same cases.

Example::
    >>> with WorkerPool(2) as pool:
    ...     [case.outcome for case in sweep("olmo", pool)]
    ['verified', 'verified', 'verified']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import TPError

if TYPE_CHECKING:
    from .launch import WorkerPool


def families() -> list[str]:
    """The registered families a model type builds (the sweep's families)."""
    from ..plan.registry import load_registry

    registry = load_registry()
    return [f for f in registry.families if registry.inherited(f, "model_types")]


def cases(family: str) -> list[tuple[str, Any]]:
    """(option, value) for each forward-changing option of the family's config class."""
    from ..infer.flags import forward_flags
    from .models import family_config

    return forward_flags(type(family_config(family)))


def runs_unsharded(family: str, overrides: dict) -> str | None:
    """Why the unsharded tiny model cannot run with ``overrides``, or None."""
    import torch

    from .models import tiny_model

    try:
        model = tiny_model(family, **overrides)
        model(input_ids=torch.randint(3, 64, (1, 8)))
    except Exception as e:  # the option needs other settings, or this transformers lacks it
        return f"{type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}"
    return None


def verify_or_refuse(spec) -> tuple[str, Any]:
    """One rank's ``verify_rank(spec)``; a refusal comes back as a value, since a task that raises
    would close the shared pool."""
    from .verify import verify_rank

    try:
        return "ran", verify_rank(spec)
    except TPError as e:
        return "refused", f"{type(e).__name__}: {str(e).splitlines()[0]}"


@dataclass(frozen=True)
class Case:
    option: str
    value: Any
    outcome: str  # verified / refused / skipped / wrong
    reason: str = ""  # why refused, skipped or wrong


def run_case(family: str, option: str, value: Any, pool: WorkerPool) -> Case:
    """One option of ``family`` on ``pool``'s ranks."""
    from .verify import VerifyResult, VerifySpec

    overrides = {option: value}
    why_not = runs_unsharded(family, overrides)
    if why_not:
        return Case(option, value, "skipped", f"the unsharded model does not run: {why_not}")
    outcome, found = pool.run(verify_or_refuse, VerifySpec(family, config_overrides=overrides))[0]
    if outcome == "refused":
        return Case(option, value, "refused", found)
    result = VerifyResult(**found)
    if result.ok:
        return Case(option, value, "verified")
    return Case(option, value, "wrong", f"logits {result.logits_max_abs:.1e}, grad {result.worst_grad_rel:.1e}, "
                                        f"gathered parameters {'exact' if result.gathered_exact else 'differ'}, "
                                        f"collectives {'as' if result.collectives_ok else 'not as'} planned")


def sweep(family: str, pool: WorkerPool) -> list[Case]:
    """Every forward-changing option of ``family``, one at a time, on ``pool``'s ranks."""
    return [run_case(family, option, value, pool) for option, value in cases(family)]
