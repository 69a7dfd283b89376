"""Command line: ``python -m tp plan ...`` (dry run), ``python -m tp verify ...`` and ``python -m tp census``.

Only the standard library is imported to parse the command line: torch and transformers load
when a command runs, so that ``--help`` and ``--version`` answer at once. Every user mistake
is one ``error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import warnings
from pathlib import Path

from .errors import PlanError, TPError

DISTRIBUTION = "tp-dtensor"  # the name on the package index; "tp" there is an unrelated package


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake like every other user error: one line, exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _versions() -> str:
    """Read from the installed distributions' metadata, which is quick: nothing is imported."""
    from importlib import metadata

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return (f"{DISTRIBUTION} {version(DISTRIBUTION)} (import tp); torch {version('torch')}; "
            f"transformers {version('transformers')}")


class _Version(argparse.Action):
    """``--version``; the versions are looked up only when it is given."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(_versions())
        parser.exit(0)


def tp_size(text: str) -> int:
    """``--tp``: the number of tensor-parallel ranks; 1 is a valid no-op (nothing is split)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"expected an integer of at least 1 (the number of tensor-parallel ranks), got {text!r}")
    return value


def _add_plan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=tp_size, default=2, help="tensor-parallel size, at least 1 (default 2)")
    p.add_argument("--allreduce", default=None, help="comma-separated patterns of row-parallel linears")
    p.add_argument("--keep", default=None, help="comma-separated patterns of linears kept whole")
    p.add_argument("--config", default=None, help="TOML file with allreduce_linear_items / keep_linear_items")
    p.add_argument("--registry", default=None, help="user registry.toml merged over the built-in one")
    p.add_argument("--strict", action="store_true", help="a pattern that matches nothing is an error")
    p.add_argument("--fix-overrides", action="store_true",
                   help="where --keep (or KEEP_LINEAR_ITEMS) keeps one linear of a column-parallel group whole, "
                        "keep its whole unit (e.g. q, k, v and o of the attention) instead of refusing the plan")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="shard the activations between blocks along the sequence")
    p.add_argument("--model", default=None, metavar="PACKAGE.MODULE:FACTORY",
                   help="your own model: a function that returns it, importable from the current directory "
                        "or PYTHONPATH (instead of a family)")
    p.add_argument("--json", action="store_true", help="print one JSON object (schema: README, Command line)")


def _print_json(data: dict) -> None:
    print(json.dumps(data, indent=2))


# ------------------------------------------------------------------------------- --model factories


def model_factory(spec: str):
    """The function ``--model package.module:factory`` names. The current directory is searched
    as ``python -m`` does, for the ``tp`` command too; the ranks' processes inherit the path."""
    import importlib

    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise PlanError(f"--model {spec!r}: expected PACKAGE.MODULE:FACTORY, e.g. --model my_models:make_model")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise PlanError(f"--model {spec}: cannot import {module_name} ({e}); run from the directory that holds it "
                        "or add that directory to PYTHONPATH") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise PlanError(f"--model {spec}: {module_name} has no function {name!r}"
                        + (f" ({name} is a {type(factory).__name__})" if factory is not None else ""))
    return factory


def _only_one_model(args, named: str | None) -> None:
    if args.model and named:
        raise PlanError(f"give a family or model type ({named!r}) or --model {args.model}, not both")


# ---------------------------------------------------------------------------------------- plan


def _plan_model(args):
    """(model, family or None) of the plan's target: --model, or on the meta device a local model
    directory, a family or a model type."""
    from .infer.tiny import build
    from .testing.models import encoder_decoder

    _only_one_model(args, args.target)
    if args.model:  # built as the factory builds it: the plan of a model no family claims is traced on it
        return model_factory(args.model)(), None
    if not args.target:
        raise PlanError("give a family, a model type, a model directory or --model PACKAGE.MODULE:FACTORY")
    config, family = _meta_config(args)
    return build(config, device="meta", encoder_decoder=encoder_decoder(config, family)), family


def _meta_config(args):
    """(config, family) of the plan's target: a local model directory, a family or a model type."""
    from .testing.models import family_config, registered_family

    target = Path(args.target)
    if not target.is_dir():
        return family_config(args.target, tiny=args.tiny, registry=args.registry), \
            registered_family(args.target, args.registry)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(target, local_files_only=True), None
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PlanError(f"{target} is a directory but not a model transformers can read ({first}); "
                        "give a directory with a config.json, a family or a model type") from None


def _plan(args) -> int:
    from .checks import sizes
    from .checks.report import build as build_report
    from .resolution import resolve

    with warnings.catch_warnings(record=True) as caught:  # shown once, with the plan's own warnings
        warnings.simplefilter("always")
        model, family = _plan_model(args)
        resolved = resolve(model, args.tp, family=family, allreduce=args.allreduce, keep=args.keep,
                           config=args.config, registry=args.registry, strict=args.strict,
                           sequence_parallel=args.sequence_parallel, fix_overrides=args.fix_overrides)
        problems, working = sizes.problems(model, resolved, args.tp)
    if problems:
        problems.append(f"TP sizes that divide every sharded size: {', '.join(map(str, working))}")
    problems = resolved.inconsistencies + problems
    report = build_report(model, resolved, args.tp, problems)
    report.warnings = list(dict.fromkeys([*report.warnings, *(str(w.message) for w in caught)]))
    view = PlanView(model, report, args.target or args.model, working if problems else None)
    if args.json:
        _print_json(view.as_json(show_all=args.all))
    else:
        print(view.text(show_all=args.all))
    return 1 if problems else 0


# "weight [201, 64] -> [101, 64] (dim 0 per rank: 101, 100)": the note only where ranks differ
_PARAMETER = re.compile(r"([\w.]+) \[([\d, ]*)\] -> \[([\d, ]*)\](?: \((?:dim (\d+) per rank: ([\dx, ]+)|"
                        r"stored whole; each rank computes with ([\dx, ]+) of dim (\d+))\))?")


def _numbers(text: str) -> list[int]:
    return [int(n) for n in text.split(",") if n.strip()]


def _runs(text: str) -> list[int]:
    """``"51 x3, 49"`` -> ``[51, 51, 51, 49]``."""
    sizes = []
    for run in text.split(","):
        size, _, count = run.strip().partition(" x")
        sizes += [int(size)] * int(count or 1)
    return sizes


class PlanView:
    """What ``tp plan`` shows of a report (tp/checks/report.py): the modules outside the repeated
    blocks, one block per distinct block structure with its number of layers, and the
    parameter bytes each rank holds. The text and the JSON are made from the same rows."""

    def __init__(self, model, report, target: str, working: list[int] | None):
        from .plan.structure import find_blocks

        self.model, self.report, self.target, self.working = model, report, target, working
        self.groups = _group_blocks(report.rows, find_blocks(model))

    def parameters(self, row) -> list[dict]:
        """The row's parameters, read back from its shapes column: global and per-rank shape (rank
        0's, the largest), and where the ranks hold different sizes, each rank's size of the
        sharded dimension (``uneven``: ``{dim, sizes}``, else null), and where the tensor is stored
        whole for a layout that gives some rows to several ranks, how many of the dimension each
        rank computes with (``computes``: ``{dim, sizes}``, else null)."""
        return [{"name": name, "shape": _numbers(whole), "per_rank": _numbers(local),
                 "uneven": {"dim": int(dim), "sizes": _runs(sizes)} if dim else None,
                 "computes": {"dim": int(used_dim), "sizes": _runs(used)} if used_dim else None}
                for name, whole, local, dim, sizes, used, used_dim in _PARAMETER.findall(row.shapes)]

    def parameter_bytes(self) -> tuple[int, int]:
        """(unsharded, per rank): every parameter once (tied ones too), at its per-rank shape."""
        unsharded = sum(p.numel() * p.element_size() for p in self.model.parameters())
        saved, seen = 0, set()
        for row in self.report.rows:
            module = self.model.get_submodule(row.module)
            for param in self.parameters(row):
                tensor = module.get_parameter(param["name"])
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    saved += (_product(param["shape"]) - _product(param["per_rank"])) * tensor.element_size()
        return unsharded, unsharded - saved

    def shown(self, show_all: bool) -> list[tuple[object, int | None]]:
        """(row, index of its block group or None) in model order; the rows of a group's later
        layers only with ``show_all``."""
        hidden = set() if show_all else {r.module for g in self.groups for r in g.later_rows}
        group_of = {r.module: i for i, g in enumerate(self.groups) for r in g.rows}
        return [(r, group_of.get(r.module)) for r in self.report.rows if r.module not in hidden]

    def text(self, show_all: bool = False) -> str:
        report, unsharded, per_rank = self.report, *self.parameter_bytes()
        lines = [f"tp plan: family {report.family or '(none: inferred from the module structure)'}, tp={report.tp}"]
        lines += [f"warning: {w}" for w in report.warnings]
        table = [("module", "type", "style", "decided by", "parameter shapes: global -> per rank")]
        after: dict[int, str] = {}  # table row -> the "x N layers" line that follows it
        for row, group in self.shown(show_all):
            table.append((row.module, row.kind, row.style, row.source, row.shapes))
            if group is not None and not show_all and row is self.groups[group].rows[-1]:
                after[len(table) - 1] = f"  x {self.groups[group].label()}"
        widths = [max(len(cells[i]) for cells in table) for i in range(4)]
        for i, cells in enumerate(table):
            lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + cells[4])
            if i in after:
                lines.append(after[i])
        if show_all:
            lines += [f"blocks: {g.label()}" for g in self.groups]
        c = report.collectives
        lines.append(f"parameter bytes per rank: {per_rank:,} of {unsharded:,} ({per_rank / max(unsharded, 1):.2f})")
        lines.append(f"expected collectives: forward {c.forward_per_block} per block x {c.blocks} blocks + "
                     f"{c.forward_outside} (embedding, lm_head) = {c.forward}; backward {c.backward_per_block} per "
                     f"block x {c.blocks} + {c.backward_outside} = {c.backward}")
        lines += [f"problem: {p}" for p in report.problems]
        return "\n".join(lines)

    def as_json(self, show_all: bool = False) -> dict:
        report, (unsharded, per_rank) = self.report, self.parameter_bytes()
        return {
            "command": "plan", "target": self.target, "family": report.family, "tp": report.tp,
            "warnings": list(report.warnings), "problems": list(report.problems),
            "working_tp_sizes": self.working,
            "modules": [{"module": r.module, "type": r.kind, "style": r.style, "source": r.source,
                         "parameters": self.parameters(r), "block_group": group}
                        for r, group in self.shown(show_all)],
            "block_groups": [{"layers": g.layers, "count": len(g.layers)} for g in self.groups],
            "parameter_bytes": {"unsharded": unsharded, "per_rank": per_rank},
            "collectives": {**dataclasses.asdict(report.collectives),
                            "forward": report.collectives.forward, "backward": report.collectives.backward},
        }


def _product(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclasses.dataclass
class _BlockGroup:
    """Repeated blocks with the same structure: modules, styles, sources and shapes."""

    layers: list[str]
    rows: list  # the first layer's
    later_rows: list = dataclasses.field(default_factory=list)

    def label(self) -> str:
        n = len(self.layers)
        return f"{n} layer{'s' if n > 1 else ''}: {_layer_names(self.layers)}"


def _group_blocks(rows, blocks: list[str]) -> list[_BlockGroup]:
    """The block groups, in the order of their first layer. A row belongs to the outermost block
    that holds its module; the structure of a block is its rows with the block's path left out."""
    block_set, by_block = set(blocks), {b: [] for b in blocks}
    for row in rows:
        parts = row.module.split(".")
        owner = next((".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in block_set), None)
        if owner is not None:
            by_block[owner].append(row)
    groups: dict[tuple, _BlockGroup] = {}
    for block in blocks:
        found = by_block[block]
        # a module sharded by its parent names it ("sharded by model.layers.0.mamba"): the same in every block
        key = tuple((r.module[len(block):], r.kind, r.style, r.source.replace(block + ".", "."), r.shapes)
                    for r in found)
        if key in groups:
            groups[key].layers.append(block)
            groups[key].later_rows += found
        else:
            groups[key] = _BlockGroup([block], found)
    return list(groups.values())


def _layer_names(paths: list[str]) -> str:
    """``model.layers.0-31`` or ``model.layers.0, 2, 4-6``: numbered children of one list, compact."""
    prefixes = {p.rpartition(".")[0] for p in paths}
    indices = [p.rpartition(".")[2] for p in paths]
    if len(prefixes) != 1 or not all(i.isdigit() for i in indices):
        return ", ".join(paths)
    numbers, spans = sorted(map(int, indices)), []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return prefixes.pop() + "." + ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)


# -------------------------------------------------------------------------------------- verify


def _check_before_starting(args) -> None:
    """Bad input found here, in one process, costs a fraction of a second; found on the ranks it
    would wait for their start."""
    from .plan import overrides
    from .plan.registry import load_registry
    from .testing.models import family_config

    load_registry(args.registry)  # unreadable registry
    if not args.model:
        family_config(args.family, registry=args.registry)  # unknown family
    overrides.collect(args.allreduce, args.keep, args.config)  # unreadable config file


def _verify(args) -> int:
    from .testing.verify import verify

    _only_one_model(args, args.family)
    args.family = None if args.model else args.family or "llama"
    _check_before_starting(args)
    factory = model_factory(args.model) if args.model else None
    # Every rank would print each warning of tp.apply (and of its trial) again; the report's
    # warnings are printed once below instead. Read by the ranks' processes when they start.
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    result = verify(args.family, model_factory=factory, tp=args.tp, allreduce=args.allreduce, keep=args.keep, config=args.config,
                    registry=args.registry, strict=args.strict, sequence_parallel=args.sequence_parallel,
                    fix_overrides=args.fix_overrides)
    if args.json:
        data = {"command": "verify", "result": "PASS" if result.ok else "FAIL", "ok": result.ok,
                "collectives_ok": result.collectives_ok, **dataclasses.asdict(result)}
        if not args.show_plan:
            del data["report"]
        _print_json(data)
    else:
        if args.show_plan:
            print(result.report)  # the plan's warnings are part of it
        else:
            for warning in result.warnings:
                print(f"warning: {warning}")
        print(result.table())
    return 0 if result.ok else 1


# ---------------------------------------------------------------------------------------- main


def parser() -> argparse.ArgumentParser:
    from .testing import census

    top = _Parser(prog="python -m tp", description="Tensor parallelism on DTensor: plan a model's sharding "
                  "(dry run), verify it on CPU processes, or check every model type of transformers.")
    top.add_argument("--version", action=_Version, help="print the versions of tp-dtensor, torch and transformers")
    commands = top.add_subparsers(dest="command", required=True, metavar="{plan,verify,census}")

    plan = commands.add_parser("plan", help="dry run on the meta device: styles, sources, per-rank shapes")
    plan.add_argument("target", nargs="?", help="a registry family (e.g. llama), any transformers model type, "
                                                "or a local model directory (or --model)")
    plan.add_argument("--tiny", action="store_true", help="use the family's tiny test config, not its full size")
    plan.add_argument("--all", action="store_true", help="every module, not one block per block structure")
    _add_plan_options(plan)
    plan.set_defaults(run=_plan)

    verify = commands.add_parser("verify", help="shard a tiny model on CPU processes and compare with unsharded")
    verify.add_argument("family", nargs="?", default=None,
                        help="registry family or transformers model type (default llama; or --model)")
    verify.add_argument("--show-plan", action="store_true", help="print the plan report too")
    _add_plan_options(verify)
    verify.set_defaults(run=_verify)

    checks = commands.add_parser("census", help="shard every causal-LM type of transformers and check each",
                                 description=census.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    census.add_arguments(checks)
    checks.set_defaults(run=census.run)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    # transformers' log lines (slow-kernel fallbacks, ...) say nothing about the plan; a user who
    # wants them sets TRANSFORMERS_VERBOSITY. Set before transformers is imported, here and on the ranks.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return args.run(args)
    except TPError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
