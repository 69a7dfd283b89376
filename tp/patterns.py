"""Module-name patterns, as used by plans and the ALLREDUCE/KEEP overrides.

A pattern is a dotted name whose parts are matched, with shell-style wildcards, against
the *last* parts of a module's dotted path. So ``o_proj`` matches every module whose
path ends in ``.o_proj``, ``layers.*.mlp`` matches ``model.layers.3.mlp``, and a full
path matches exactly that module.
"""

from __future__ import annotations

import difflib
from fnmatch import fnmatchcase


def matches(pattern: str, path: str) -> bool:
    want = pattern.split(".")
    have = path.split(".")
    if len(want) > len(have):
        return False
    return all(fnmatchcase(h, w) for h, w in zip(have[len(have) - len(want):], want))


def specificity(pattern: str) -> tuple[int, int]:
    """Orders patterns from general to specific: more parts first, then fewer wildcards."""
    parts = pattern.split(".")
    return len(parts), -sum(p.count("*") + p.count("?") for p in parts)


def split_items(value: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Accepts ``"a,b"`` (the environment form) or a list, and drops blanks."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of module-name patterns or one comma-separated string, found {value!r}")
    return [v.strip() for v in value if v.strip()]


def closest_names(pattern: str, paths: list[str], n: int = 3) -> list[str]:
    """Module paths that look most like ``pattern``, for 'did you mean' messages."""
    tail = pattern.split(".")
    suffixes = {".".join(p.split(".")[-len(tail):]): p for p in paths}
    close = difflib.get_close_matches(pattern, list(suffixes), n=n, cutoff=0.4)
    return [suffixes[c] for c in close]
