"""Which plan entry decides a module: the most specific matching pattern, and patterns that match nothing."""

from __future__ import annotations

import warnings

from ..errors import PlanError
from ..patterns import closest_names, matches, specificity
from ..styles import StyleSpec


def best_match(path: str, plan: dict[str, StyleSpec], where: str) -> tuple[str, StyleSpec] | None:
    hits = [p for p in plan if matches(p, path)]
    if not hits:
        return None
    top = max(specificity(p) for p in hits)
    best = [p for p in hits if specificity(p) == top]
    if len({plan[p] for p in best}) > 1:
        choices = ", ".join(f"{p!r} -> {plan[p]}" for p in best)
        raise PlanError(f"{where}: module {path} is matched by equally specific patterns with different styles "
                        f"({choices}); make one of them more specific")
    return best[0], plan[best[0]]


def report_unmatched(patterns, used, paths, where, strict, problems) -> None:
    for pattern in patterns:
        if pattern in used:
            continue
        hint = closest_names(pattern, paths)
        message = f"{where}: pattern {pattern!r} matches no module" + (
            f"; closest: {', '.join(hint)}" if hint else "")
        problems.append(message)
        if strict:
            raise PlanError(message + " (strict mode)")
        warnings.warn(message, stacklevel=5)  # the user's call of tp.resolve
