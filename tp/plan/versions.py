"""The transformers releases the registry's plans and the suite were tested with.

transformers changes model code under the plans (transformers 5.24 made CodeGen read its block
width from an attribute). Outside these releases tp warns once; the consistency check and, for
plans inferred from the dataflow, the trial still guard the result.
"""

from __future__ import annotations

import functools
import warnings

TESTED_TRANSFORMERS = ("5.23", "5.24", "5.25")  # major.minor; CI runs the suite on the first and the last


@functools.cache
def warn_if_untested() -> str | None:
    """Warn, once per process, when the installed transformers is not a tested release; returns
    the warning, or None."""
    import transformers

    release = ".".join(transformers.__version__.split(".")[:2])
    if release in TESTED_TRANSFORMERS:
        return None
    message = (f"transformers {transformers.__version__} is not a release tp was tested with "
               f"({', '.join(TESTED_TRANSFORMERS)}); check your model with `python -m tp verify` or tp.verify")
    warnings.warn(message, stacklevel=3)
    return message
