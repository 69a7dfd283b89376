"""The styles a plan can name, and a style as a plan writes it (``StyleSpec``).

Adding a built-in style: a module in this package that defines its ``Style``, and a line in
``BUILTIN``. A user registry adds a style with ``[styles] name = "file.py:ATTRIBUTE"`` (or a
dotted module path), which ``register`` takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from torch import nn
from torch.distributed.tensor.parallel import ParallelStyle

from ..errors import PlanError
from ..sharding.heads import Heads
from .descriptor import Args, Site, Style
from .experts import EXPERTS
from .gathered_norm import GATHERED_NORM
from .head_input import HEAD_INPUT
from .head_norm import HEAD_NORM
from .linear import COLWISE, EMBEDDING, LM_HEAD, ROWWISE, ROWWISE_INTO_SHARDED
from .mamba import MAMBA_MIXER
from .mamba2 import MAMBA2_MIXER
from .per_head_norms import PER_HEAD_NORMS
from .sequence import SEQUENCE_BLOCK, SEQUENCE_COLWISE, SEQUENCE_GATHER, SEQUENCE_PARALLEL, SEQUENCE_SHARD
from .shard_rows import SHARD_ROWS
from .sum_grads import SUM_GRADS
from .whole import BLOCK_INPUT, KEEP, REPLICATE

BUILTIN: tuple[Style, ...] = (
    COLWISE, ROWWISE, ROWWISE_INTO_SHARDED, KEEP, REPLICATE, EXPERTS, EMBEDDING, LM_HEAD, SEQUENCE_PARALLEL,
    SEQUENCE_SHARD, HEAD_NORM, HEAD_INPUT, SUM_GRADS, SHARD_ROWS, GATHERED_NORM, MAMBA_MIXER, MAMBA2_MIXER,
    BLOCK_INPUT,
    SEQUENCE_BLOCK, SEQUENCE_COLWISE, SEQUENCE_GATHER, PER_HEAD_NORMS,
)

STYLES: dict[str, Style] = {style.name: style for style in BUILTIN}


def register(style: Style, *, source: str) -> None:
    """Add a contributed style; ``source`` names where it came from, for errors.

    Registering the same name again replaces the earlier one (a user registry read again after
    an edit); a built-in name cannot be taken."""
    if style.name in {s.name for s in BUILTIN}:
        raise ValueError(f"{source}: style {style.name!r} is built in; give the contributed style another name")
    STYLES[style.name] = style


def get(name: str) -> Style:
    if name not in STYLES:
        raise ValueError(f"unknown style {name!r}; allowed: {', '.join(STYLES)}")
    return STYLES[name]


def _argument_error(name: str, style: Style, error: ValidationError) -> ValueError:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        unknown = sorted(str(e["loc"][0]) for e in error.errors() if e["type"] == "extra_forbidden")
        allowed = ", ".join(style.args.model_fields) or "none"
        return ValueError(f"style {name!r} takes no argument {', '.join(unknown)}; allowed: {allowed}")
    if first["type"] == "missing":
        return ValueError(f"style {name!r} needs the argument {key}")
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error":
        return ValueError(f"style {name!r}: {message}")
    return ValueError(f"style {name!r}: {key}: {message.lower()}, found {first.get('input')!r}")


@dataclass(frozen=True)
class StyleSpec:
    """A style name with its keyword arguments, as written in a plan."""

    name: str
    args: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, value: str | dict[str, Any]) -> StyleSpec:
        """``"colwise"`` or ``{style = "lm_head", loss_parallel = true}``; raises ValueError."""
        if isinstance(value, str):
            name, args = value, {}
        elif isinstance(value, dict) and "style" in value:
            args = dict(value)
            name = args.pop("style")
        else:
            raise ValueError(f"expected a style name or a table with a 'style' key, found {value!r}")
        args = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}  # hashable
        spec = cls(name, tuple(sorted(args.items())))
        spec.options  # validates
        return spec

    @property
    def style(self) -> Style:
        return get(self.name)

    @property
    def options(self) -> Args:
        """The validated arguments; raises ValueError naming the style."""
        style = self.style
        try:
            return style.args.model_validate(dict(self.args))
        except ValidationError as e:
            raise _argument_error(self.name, style, e) from None

    def site(self, module: nn.Module, *, heads: Heads | None = None, tp: int = 1,
             sequence_parallel: bool = False, plain_input: bool = True) -> Site:
        return Site(module, self.options, heads, tp, sequence_parallel, plain_input)

    def with_args(self, **args: Any) -> StyleSpec:
        """The same style with ``args`` set (``sequence_dim`` under sequence parallelism)."""
        return StyleSpec(self.name, tuple(sorted({**dict(self.args), **args}.items())))

    def build(self, module: nn.Module | None = None, heads: Heads | None = None) -> ParallelStyle:
        return self.style.build(self.site(module, heads=heads))

    def check_module(self, path: str, module: nn.Module) -> None:
        supports = self.style.supports
        if supports and not isinstance(module, supports):
            kinds = ", ".join(t.__name__ for t in supports)
            raise PlanError(
                f"{path}: style {self.name!r} supports {kinds}, but the module is a "
                f"{type(module).__name__}; choose another style for it or leave it out of the plan"
            )

    def __str__(self) -> str:
        if not self.args:
            return self.name

        def shown(v):
            return "[" + ", ".join(map(str, v)) + "]" if isinstance(v, tuple) else str(v)

        return f"{self.name}(" + ", ".join(f"{k}={shown(v)}" for k, v in self.args) + ")"
