"""The ALLREDUCE_LINEAR_ITEMS / KEEP_LINEAR_ITEMS overrides, from each place they can come from.

Precedence, highest first: keyword arguments of ``tp.apply``, the environment, a config file
(the ``config`` argument or ``$TP_CONFIG``), then the family plan and the inferred plan.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import PlanError
from .registry import Patterns

ALLREDUCE_ENV = "ALLREDUCE_LINEAR_ITEMS"
KEEP_ENV = "KEEP_LINEAR_ITEMS"
CONFIG_ENV = "TP_CONFIG"


@dataclass(frozen=True)
class Overrides:
    """Patterns from one source: linears to make row-parallel, linears to keep whole."""

    source: str
    allreduce: list[str] = field(default_factory=list)
    keep: list[str] = field(default_factory=list)


class ConfigFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    allreduce_linear_items: Patterns = Field(default_factory=list)
    keep_linear_items: Patterns = Field(default_factory=list)


def from_config_file(path: str | os.PathLike) -> Overrides:
    path = Path(path)
    try:
        data = ConfigFile.model_validate(tomllib.loads(path.read_text()))
    except FileNotFoundError:
        raise PlanError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise PlanError(f"config file {path} is a directory; give the path of a .toml file") from None
    except UnicodeDecodeError as e:
        raise PlanError(f"config file {path} is not UTF-8 text (byte {e.start}); a config is a UTF-8 TOML file") from None
    except OSError as e:
        raise PlanError(f"config file {path} cannot be read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise PlanError(f"config file {path}: not valid TOML: {e}") from None
    except ValidationError as e:
        keys = ", ".join(".".join(map(str, err["loc"])) for err in e.errors())
        raise PlanError(
            f"config file {path}: bad key(s) {keys}; allowed: allreduce_linear_items, keep_linear_items "
            "(each a list of module-name patterns or one comma-separated string)"
        ) from None
    return Overrides(f"config file {path.name}", data.allreduce_linear_items, data.keep_linear_items)


def collect(
    allreduce: str | list[str] | None = None,
    keep: str | list[str] | None = None,
    config: str | os.PathLike | None = None,
) -> list[Overrides]:
    """Every non-empty override source, highest precedence first."""
    from ..patterns import split_items

    sources = [
        Overrides("argument", split_items(allreduce), split_items(keep)),
        Overrides("environment", split_items(os.environ.get(ALLREDUCE_ENV)), split_items(os.environ.get(KEEP_ENV))),
    ]
    config = config or os.environ.get(CONFIG_ENV)
    if config:
        sources.append(from_config_file(config))
    return [s for s in sources if s.allreduce or s.keep]
