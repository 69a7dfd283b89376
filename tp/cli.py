"""Command line: ``python -m tp plan ...`` (dry run), ``python -m tp verify ...`` and ``python -m tp census``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import TPError


def _add_plan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size (default 2)")
    p.add_argument("--allreduce", default=None, help="comma-separated patterns of row-parallel linears")
    p.add_argument("--keep", default=None, help="comma-separated patterns of linears kept whole")
    p.add_argument("--config", default=None, help="TOML file with allreduce_linear_items / keep_linear_items")
    p.add_argument("--registry", default=None, help="user registry.toml merged over the built-in one")
    p.add_argument("--strict", action="store_true", help="a pattern that matches nothing is an error")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="shard the activations between blocks along the sequence")


def _plan(args) -> int:
    from .checks import report as report_
    from .checks import sizes
    from .infer.tiny import build
    from .resolve import resolve
    from .testing.models import encoder_decoder, family_config, registered_family

    target = Path(args.target)
    if target.is_dir():
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(target, local_files_only=True)
        family = None
    else:
        config = family_config(args.target, tiny=args.tiny, registry=args.registry)
        family = registered_family(args.target, args.registry)
    model = build(config, device="meta", encoder_decoder=encoder_decoder(config, family))
    resolved = resolve(model, args.tp, family=family, allreduce=args.allreduce, keep=args.keep,
                       config=args.config, registry=args.registry, strict=args.strict,
                       sequence_parallel=args.sequence_parallel)
    problems, working = sizes.problems(model, resolved, args.tp)
    if problems:
        problems.append(f"TP sizes that divide every sharded size: {', '.join(map(str, working))}")
    problems = resolved.inconsistencies + problems
    print(report_.build(model, resolved, args.tp, problems))
    return 1 if problems else 0


def _verify(args) -> int:
    from .testing.verify import verify

    result = verify(args.family, tp=args.tp, allreduce=args.allreduce, keep=args.keep, config=args.config,
                    registry=args.registry, strict=args.strict, sequence_parallel=args.sequence_parallel)
    if args.show_plan:
        print(result.report)
    print(result.table())
    return 0 if result.ok else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["census"]:
        from .testing.census import main as census

        return census(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m tp", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    plan = commands.add_parser("plan", help="dry run on the meta device: styles, sources, per-rank shapes")
    plan.add_argument("target", help="a registry family (e.g. llama), any transformers model type, or a local model directory")
    plan.add_argument("--tiny", action="store_true", help="use the family's tiny test config, not its full size")
    _add_plan_options(plan)
    plan.set_defaults(run=_plan)

    verify = commands.add_parser("verify", help="shard a tiny model on CPU processes and compare with unsharded")
    verify.add_argument("family", nargs="?", default="llama", help="registry family or transformers model type (default llama)")
    verify.add_argument("--show-plan", action="store_true", help="print the plan report too")
    _add_plan_options(verify)
    verify.set_defaults(run=_verify)

    commands.add_parser("census", help="shard every causal-LM type of transformers, check each, write "
                                       "docs/coverage.md (python -m tp census --help)")

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except TPError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
