"""The shape of tp/: imports flow one way through its layers, no module imports one above it,
there are no import cycles, and the top level stays small."""

import ast
from pathlib import Path

TP = Path(__file__).resolve().parent.parent / "tp"

# Lowest first. A module may import from its own layer's other units only where no cycle
# results, and from any layer below.
LAYERS = [
    {"errors", "patterns", "models", "random"},
    {"sharding"},
    {"styles"},
    {"plan"},
    {"infer"},
    {"checks"},
    {"resolution"},
    {"shard"},
    {"trial"},
    {"parallelize"},
    {"checkpoint"},
    {"trainer"},
    {"testing"},
    {"cli", "__main__", "__init__"},
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _module_name(path: Path) -> str:
    parts = path.relative_to(TP.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """tp module -> the tp modules it imports, anywhere in its body (function-level imports too)."""
    graph = {}
    for path in TP.rglob("*.py"):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.split(".")[0] == "tp"}
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")
                base = base[: len(base) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                if target.split(".")[0] != "tp":
                    continue
                # "from . import x" and "from .pkg import mod" may name modules themselves
                for alias in node.names:
                    candidate = f"{target}.{alias.name}"
                    is_module = (TP.parent / candidate.replace(".", "/")).with_suffix(".py").is_file() or \
                        (TP.parent / candidate.replace(".", "/") / "__init__.py").is_file()
                    found.add(candidate if is_module else target)
        graph[name] = found - {name}
    return graph


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _imports()}
    assert units <= set(LAYER), f"add {sorted(units - set(LAYER))} to LAYERS"


def test_no_module_imports_one_of_a_higher_layer():
    upward = [f"{m} imports {t}" for m, targets in _imports().items() for t in targets
              if _unit(t) != "__init__" and LAYER[_unit(t)] > LAYER[_unit(m)]]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = _imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if target == "tp":  # the package root re-exports the API; importing it is not a dependency
                continue
            if state.get(target) == 1:
                return path + [module, target]
            if target not in state:
                cycle = visit(target, path + [module])
                if cycle:
                    return cycle
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [])
            assert cycle is None, " -> ".join(cycle)


def test_the_top_level_stays_small():
    modules = sorted(p.stem for p in TP.glob("*.py"))
    assert len(modules) <= 12, modules
