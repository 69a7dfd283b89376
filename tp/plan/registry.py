"""registry.toml: which model families tp knows, how to recognise them, and their plans.

The built-in registry ships with the package. A user registry (the ``registry`` argument of
``tp.apply``, or the ``TP_REGISTRY`` environment variable) is merged over it: a family of
the same name replaces the built-in one, and its lists extend the built-in lists.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import tomllib
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from ..errors import PlanError, RegistryError
from ..patterns import split_items
from ..styles import Style, StyleSpec, register

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # tp/


def builtin_registry_path() -> Path:
    """Installed wheels carry the file inside the package; a source checkout has it at the root."""
    for candidate in (PACKAGE_DIR / "_builtin" / "registry.toml", PACKAGE_DIR.parent / "registry.toml"):
        if candidate.is_file():
            return candidate
    raise RegistryError(f"the built-in registry.toml is missing next to {PACKAGE_DIR}; reinstall tp")


def _style(value: Any) -> StyleSpec:
    return value if isinstance(value, StyleSpec) else StyleSpec.parse(value)


PlanStyle = Annotated[StyleSpec, BeforeValidator(_style)]
Patterns = Annotated[list[str], BeforeValidator(split_items)]
LocalCount = Literal["q", "kv", "groups", "q_features", "kv_features"]


class Family(BaseModel):
    """One model family: how to recognise it and how to shard it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_types: list[str] = Field(default_factory=list, description="HF config.model_type values")
    classes: list[str] = Field(default_factory=list, description="model class names")
    extends: str | None = Field(None, description="family whose plan this one starts from")
    plan: dict[str, PlanStyle] = Field(default_factory=dict, description="module pattern -> style")
    sequence_parallel: dict[str, PlanStyle] = Field(
        default_factory=dict,
        description="module pattern -> style, used only with sequence parallelism: synchronisation points "
                    "(sequence_shard after a module) and norms beyond the derived ones")
    sequence_parallel_refused: str | None = Field(
        None, description="why this family cannot run sequence parallel (said when it is asked for)")
    block_inputs: Patterns | None = Field(
        None, description="modules whose input is replicated once; default: parents of colwise linears"
    )
    divide: Patterns = Field(
        default_factory=list, description="'module_pattern.attribute' head counts divided per rank"
    )
    heads: dict[Literal["q", "kv", "dim"], str] = Field(
        default_factory=dict, description="config attributes holding the query/kv head counts and head size")
    local_heads: dict[str, LocalCount] = Field(
        default_factory=dict,
        description="'module_pattern.attribute' -> what it counts (q, kv, groups, q_features, kv_features); "
                    "set to the per-rank value after sharding")
    python_plan: str | None = Field(None, description="file, relative to the registry, defining plan(model)")
    tiny: dict[str, Any] = Field(default_factory=dict, description="config overrides for a tiny test model")

    @model_validator(mode="after")
    def _recognisable(self) -> Family:
        if not (self.model_types or self.classes or self.extends):
            raise ValueError("a family needs model_types or classes to be recognised")
        return self


class RegistryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    styles: dict[str, str] = Field(
        default_factory=dict,
        description="style name -> 'file.py:ATTRIBUTE' (relative to the registry) or 'package.module:ATTRIBUTE' "
                    "of a tp.styles.Style")
    allreduce_linear_items: Patterns = Field(default_factory=list)
    keep_linear_items: Patterns = Field(default_factory=list)
    tiny: dict[str, Any] = Field(default_factory=dict)
    families: dict[str, Family] = Field(default_factory=dict)


class Registry:
    """The merged registry: built-in entries with user entries over them."""

    def __init__(self, files: list[tuple[Path, RegistryFile]]):
        self.files = files
        self.allreduce_linear_items: list[str] = []
        self.keep_linear_items: list[str] = []
        self.tiny: dict[str, Any] = {}
        self.families: dict[str, Family] = {}
        self.origin: dict[str, Path] = {}
        for path, entry in files:
            self.allreduce_linear_items += entry.allreduce_linear_items
            self.keep_linear_items += entry.keep_linear_items
            self.tiny.update(entry.tiny)
            for name, family in entry.families.items():
                self.families[name] = family
                self.origin[name] = path
        self._check_references()

    def _check_references(self) -> None:
        for name, family in self.families.items():
            seen = {name}
            parent = family.extends
            while parent is not None:
                if parent not in self.families:
                    raise RegistryError(
                        f"{self.origin[name]}: family {name!r}, key 'extends': found {parent!r}; "
                        f"allowed: one of the families {', '.join(sorted(self.families))}"
                    )
                if parent in seen:
                    raise RegistryError(f"{self.origin[name]}: family {name!r}, key 'extends': cycle through {parent!r}")
                seen.add(parent)
                parent = self.families[parent].extends
            if family.python_plan and not self.python_plan_path(name).is_file():
                raise RegistryError(
                    f"{self.origin[name]}: family {name!r}, key 'python_plan': found {family.python_plan!r}, "
                    f"but {self.python_plan_path(name)} does not exist; allowed: a .py file relative to the registry"
                )

    def python_plan_path(self, name: str) -> Path:
        return self.origin[name].parent / self.families[name].python_plan

    def lineage(self, name: str) -> list[str]:
        """The family and its ancestors, the family itself last."""
        chain = [name]
        while self.families[chain[0]].extends:
            chain.insert(0, self.families[chain[0]].extends)
        return chain

    def plan(self, name: str, model) -> dict[str, StyleSpec]:
        """The family's plan: inherited entries, its own, then its Python plan's entries."""
        plan: dict[str, StyleSpec] = {}
        for ancestor in self.lineage(name):
            plan.update(self.families[ancestor].plan)
            if self.families[ancestor].python_plan:
                plan.update(self._python_plan(ancestor, model))
        return plan

    def _python_plan(self, name: str, model) -> dict[str, StyleSpec]:
        path = self.python_plan_path(name)
        spec = importlib.util.spec_from_file_location(f"tp_plans.{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        build: Callable | None = getattr(module, "plan", None)
        if build is None:
            raise RegistryError(f"{path}: family {name!r} names this python_plan, but it defines no plan(model)")
        try:
            return {pattern: _style(value) for pattern, value in build(model).items()}
        except ValueError as e:
            raise RegistryError(f"{path}: plan(model) of family {name!r} returned a bad style: {e}") from None

    def inherited(self, name: str, field: str):
        """The nearest non-empty value of ``field`` along the family's lineage."""
        for ancestor in reversed(self.lineage(name)):
            value = getattr(self.families[ancestor], field)
            if value:
                return value
        return getattr(self.families[name], field)

    def tiny_config(self, name: str) -> dict[str, Any]:
        config = dict(self.tiny)
        for ancestor in self.lineage(name):
            config.update(self.families[ancestor].tiny)
        return config

    def model_type(self, name: str) -> str:
        types = self.inherited(name, "model_types")
        if not types:
            raise PlanError(f"family {name!r} names no model_types, so no tiny model can be built from its config")
        return types[0]

    def family_of(self, model) -> str | None:
        """The family recognising ``model``; user families are checked before built-in ones."""
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        classes = {cls.__name__ for cls in type(model).__mro__}
        for name in reversed(list(self.families)):
            family = self.families[name]
            if model_type in family.model_types or classes & set(family.classes):
                return name
        return None

    def get(self, name: str) -> Family:
        if name not in self.families:
            from ..patterns import closest_names

            hint = closest_names(name, sorted(self.families), n=1)
            raise PlanError(
                f"no family {name!r} in the registry"
                + (f" (did you mean {hint[0]}?)" if hint else "")
                + f". Known families: {', '.join(sorted(self.families))}; a new one is added in registry.toml"
            )
        return self.families[name]


def _describe(error: dict) -> str:
    loc = [str(part) for part in error["loc"]]
    if loc[:1] == ["families"] and len(loc) >= 2:
        where = f"family {loc[1]!r}, key {'.'.join(loc[2:]) or '(entry)'!r}"
    else:
        where = f"key {'.'.join(loc) or '(top level)'!r}"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        in_family = loc[:1] == ["families"] and len(loc) == 3
        allowed = Family.model_fields if in_family else RegistryFile.model_fields
        message = f"unknown key; allowed: {', '.join(allowed)}"
    found = error.get("input")
    return f"{where}: found {found!r}; {message}"


def _import_style(registry: Path, name: str, target: Any) -> None:
    """Register the style ``target`` ('file.py:ATTRIBUTE' or 'package.module:ATTRIBUTE') names."""
    where = f"{registry}: styles.{name}"
    source, _, attribute = target.partition(":") if isinstance(target, str) else ("", "", "")
    if not source or not attribute:
        raise RegistryError(f"{where}: found {target!r}; expected 'file.py:ATTRIBUTE' or 'package.module:ATTRIBUTE'")
    try:
        if source.endswith(".py"):
            file = registry.parent / source
            spec = importlib.util.spec_from_file_location(f"tp_styles.{name}", file)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(source)
        style = getattr(module, attribute)
    except (ImportError, OSError, AttributeError) as e:
        raise RegistryError(f"{where}: cannot load {target!r}: {e}") from None
    if not isinstance(style, Style):
        raise RegistryError(f"{where}: {target!r} is a {type(style).__name__}, not a tp.styles.Style")
    if style.name != name:
        raise RegistryError(f"{where}: {target!r} is named {style.name!r}; a style is registered under its own name")
    try:
        register(style, source=where)
    except ValueError as e:
        raise RegistryError(str(e)) from None


def load_file(path: str | os.PathLike) -> RegistryFile:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise RegistryError(f"registry file {path} does not exist") from None
    except IsADirectoryError:
        raise RegistryError(f"registry file {path} is a directory; give the path of a registry .toml file") from None
    except UnicodeDecodeError as e:
        raise RegistryError(f"registry file {path} is not UTF-8 text (byte {e.start}); "
                            "a registry is a UTF-8 TOML file") from None
    except OSError as e:
        raise RegistryError(f"registry file {path} cannot be read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise RegistryError(f"{path}: not valid TOML: {e}") from None
    # contributed styles first: the plans below may name them
    styles = data.get("styles")
    for name, target in (styles.items() if isinstance(styles, dict) else ()):
        _import_style(path, name, target)
    try:
        return RegistryFile.model_validate(data)
    except ValidationError as e:
        lines = "\n  ".join(_describe(err) for err in e.errors())
        raise RegistryError(f"{path}: invalid registry entry:\n  {lines}") from None


@lru_cache(maxsize=8)
def _load(paths: tuple[Path, ...], stamps: tuple[int, ...]) -> Registry:
    return Registry([(p, load_file(p)) for p in paths])


def load_registry(user: str | os.PathLike | None = None) -> Registry:
    """The built-in registry with ``user`` (or ``$TP_REGISTRY``) merged over it."""
    paths = [builtin_registry_path()]
    user = user or os.environ.get("TP_REGISTRY")
    if user:
        paths.append(Path(user).resolve())
    # The modification times are part of the cache key, so an edited file is read again.
    stamps = tuple(p.stat().st_mtime_ns if p.is_file() else -1 for p in paths)
    return _load(tuple(paths), stamps)
