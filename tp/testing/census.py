"""``python -m tp census``: every causal-LM type of the installed transformers, sharded and checked.

For each model type in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``: build a tiny random model
(``tp/infer/tiny.py``) on CPU; if it builds and runs, shard it with ``tp.apply`` and no user
configuration at TP=2, and at TP=4 where its sizes allow, and compare forward and backward
with the unsharded model (``tp.verify``). The result is a markdown table, one row per type,
printed (``--json``: one JSON object); ``--output FILE`` writes the table to a file instead,
and only ``--write-docs`` rewrites the committed ``docs/coverage.md``. The exit code is 1 when
any row is wrong or an error. Progress, with a count and the time left, goes to stderr;
transformers' warnings are silenced.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import PlanError, TPError

if TYPE_CHECKING:  # .launch imports torch: only when a census runs, not to parse the command line
    from .launch import WorkerPool

SIZES = (2, 4)
MAX_PARAMS = 20_000_000
OUTCOMES = ("verified", "partial", "refused", "wrong", "error")
FAILED = ("wrong", "error")  # outcomes that make the census exit with 1
COMMITTED_TABLE = Path(__file__).resolve().parents[2] / "docs" / "coverage.md"


def tiny_model(model_type: str):
    """A tiny float32 model of ``model_type`` (module level, so worker processes can call it)."""
    from ..infer.tiny import build, tiny_config

    return build(tiny_config(model_type))


@dataclass
class Row:
    model_type: str
    source: str = ""
    transformers_plan: str = ""
    results: dict[int, str] = field(default_factory=dict)
    logits: float | None = None
    grad: float | None = None
    per_layer: str = ""
    params_per_rank: str = ""
    note: str = ""

    @property
    def status(self) -> str:
        """verified / partial / refused / wrong / error, from the TP=2 result; sizes that do not
        divide at TP=2 are a refusal too (tp.apply raises SizeError with the reason)."""
        status = self.results.get(2, "does not build").split(":")[0]
        return "refused" if status == "n/a" else status

    @property
    def failed(self) -> bool:
        """Wrong or an error at any TP size."""
        return any(result.split(":")[0] in FAILED for result in self.results.values())

    def as_json(self) -> dict:
        return {"model_type": self.model_type, "status": self.status, "plan": self.source,
                "transformers_plan": self.transformers_plan, "results": {str(k): v for k, v in self.results.items()},
                "logits": self.logits, "grad": self.grad, "per_layer": self.per_layer,
                "params_per_rank": self.params_per_rank, "note": self.note}


def build_problem(model_type: str) -> str | None:
    """None if a tiny model of this type builds and runs forward and backward on CPU, else why not."""
    import torch

    from ..checks.compare import for_checking, token_ids
    from ..infer.tiny import CANNOT_BUILD, build, tiny_config

    if model_type in CANNOT_BUILD:
        return CANNOT_BUILD[model_type]

    try:
        config = tiny_config(model_type)
        size = sum(p.numel() for p in build(config, device="meta").parameters())
        if size > MAX_PARAMS:  # the tiny sizes did not reach some sub-model: it would not fit
            return f"its tiny config still has {size:,} parameters"
        model = for_checking(build(config))
        ids = token_ids(model, (2, 16), torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
    except Exception as e:
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
    return None


def _plan_facts(model_type: str, tps: tuple[int, ...]) -> tuple[str, str, dict[int, list[str]]]:
    """(source of the plan, what transformers' plan covers, why each TP size cannot work). The
    plan does not depend on the TP size; only the size checks do."""
    from ..checks import sizes
    from ..infer.hf_plans import describe, transformers_plan
    from ..resolution import resolve

    model = tiny_model(model_type)
    theirs = describe(transformers_plan(model))
    try:
        resolved = resolve(model, max(tps))
    except TPError:
        return "inferred", theirs, {tp: [] for tp in tps}
    problems = {tp: sizes.problems(model, resolved, tp)[0] for tp in tps}
    for tp in tps:  # tp.apply keeps an inferred unit whole when its sizes do not divide
        if resolved.units and len(sizes.unit_problems(model, resolved, tp)) < len(resolved.units):
            problems[tp] = []
    if resolved.family:
        return f"registry ({resolved.family})", theirs, problems
    sources = {d.source.split(";")[0] for d in resolved.decisions.values() if d.style.name not in
               ("embedding", "lm_head", "block_input")}
    source = "transformers plan" if sources == {"transformers plan (dataflow agrees)"} else \
        "inferred + transformers plan" if any(s.startswith("transformers") for s in sources) else "inferred"
    return source, theirs, problems


def _verify(model_type: str, tp: int, pool: WorkerPool):
    from .verify import verify

    return verify(model_factory=functools.partial(tiny_model, model_type), tp=tp, pool=pool)


def census_row(model_type: str, pools: dict[int, WorkerPool], sizes_: tuple[int, ...] = SIZES) -> Row:
    from .launch import WorkerError

    row = Row(model_type)
    why_not = build_problem(model_type)
    if why_not:
        row.note = why_not
        return row
    try:
        row.source, row.transformers_plan, problems = _plan_facts(model_type, sizes_)
    except Exception as e:  # a bug of ours: reported, and the census goes on
        row.results = {tp: f"error: {type(e).__name__}: {e}" for tp in sizes_}
        return row
    for tp in sizes_:
        if problems[tp]:
            row.results[tp] = "n/a: " + problems[tp][0]
            continue
        try:
            result = _verify(model_type, tp, pools[tp])
        except TPError as e:
            message = str(e).strip().splitlines()[0]
            if isinstance(e, WorkerError):
                row.results[tp] = f"error: {getattr(e, 'remote_type', '')}: {getattr(e, 'remote_message', message)}"
            else:
                row.results[tp] = f"refused: {message}"
            continue
        partial = [w for w in result.warnings if "stays whole" in w]
        exact = (result.logits_max_abs <= result.logits_atol and result.worst_grad_rel <= result.grad_rtol
                 and result.gathered_exact)
        row.results[tp] = ("partial" if partial else "verified") if exact else "wrong"
        if exact and not result.collectives_ok:  # HRM runs its blocks several times per forward
            partial.append(f"collectives {sum(result.forward_collectives.values())} forward / "
                           f"{sum(result.backward_collectives.values())} backward, not the {result.expected_forward} / "
                           f"{result.expected_backward} the plan predicts for one pass over the blocks")
        notes = list(partial)
        if tp == 2 or row.logits is None:
            row.logits, row.grad = result.logits_max_abs, result.worst_grad_rel
            row.per_layer = f"{result.per_block_forward} / {result.per_block_backward}"
            row.params_per_rank = f"{result.param_bytes_per_rank / result.param_bytes_unsharded:.2f}"
            row.note = "; ".join(notes)
        else:  # what only this size keeps whole
            extra = [f"TP={tp}: {n}" for n in notes if n.partition(" stays whole")[0] not in row.note]
            row.note = "; ".join([row.note, *extra] if row.note else extra)
    return row


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def summary(rows: list[Row]) -> dict[str, int]:
    """How many types there are, how many build, and how many of those had each outcome at TP=2."""
    built = [r for r in rows if r.results]
    return {"model_types": len(rows), "build": len(built), **{s: sum(r.status == s for r in built) for s in OUTCOMES}}


def render(rows: list[Row], transformers_version: str, seconds: float) -> str:
    counts = summary(rows)
    correct, built = counts["verified"] + counts["partial"], counts["build"]
    lines = [
        "# Coverage: every causal-LM type of transformers, sharded with no configuration",
        "",
        f"Written by `python -m tp census --write-docs` (transformers {transformers_version}, {seconds / 60:.0f} min on 2 CPU cores).",
        "Each tiny random model (`tp/infer/tiny.py`) is sharded with `tp.apply(model, mesh)` and nothing else, over",
        "CPU gloo processes, and compared with the unsharded model: logits max abs diff <= 1e-5, every",
        "gradient <= 1e-4 relative, gathered parameters bit-exact, collectives as the plan predicts.",
        "",
        f"- model types: {len(rows)}; build and run on CPU: {built}",
        (f"- verified correct at TP=2, forward and backward: **{correct} of {built} "
         f"({100 * correct / max(built, 1):.0f}%)**; {counts['verified']} with every block unit sharded, "
         f"{counts['partial']} with some units kept whole (see notes)"),
        f"- refused with a reason: {counts['refused']}; wrong results: {counts['wrong']}; errors: {counts['error']}",
        "",
        "Columns: *plan* is the source that decided (a registry family; the dataflow trace, confirmed by",
        "transformers' own plan where it says the same; or the trace alone). *transformers plan* is what",
        "`base_model_tp_plan` covers. *per layer* is collectives per block, forward / backward. *params* is",
        "the fraction of parameter bytes each rank holds at TP=2.",
        "",
        "| model type | plan | transformers plan | TP=2 | TP=4 | logits | grad (rel) | per layer | params | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r.results:
            lines.append(f"| {r.model_type} | | | does not build | | | | | | {_cell(r.note)} |")
            continue
        tp2, tp4 = r.results.get(2, ""), r.results.get(4, "")
        reasons = [text.partition(": ")[2] for text in (tp2, tp4) if ":" in text]
        note = "; ".join(dict.fromkeys([*reasons, r.note] if r.note else reasons))  # each reason once
        logits = f"{r.logits:.1e}" if r.logits is not None else ""
        grad = f"{r.grad:.1e}" if r.grad is not None else ""
        lines.append(f"| {r.model_type} | {r.source} | {r.transformers_plan} | {tp2.split(':')[0]} | "
                     f"{tp4.split(':')[0]} | {logits} | {grad} | {r.per_layer} | {r.params_per_rank} | {_cell(note)} |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--types", default=None, help="comma-separated model types (default: all)")
    parser.add_argument("--output", default=None, help="write the markdown table to this file (default: print it)")
    parser.add_argument("--write-docs", action="store_true",
                        help=f"rewrite the committed table, {COMMITTED_TABLE.parent.name}/{COMMITTED_TABLE.name} "
                             "(a full census only)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (schema: README, Command line)")


def model_types(names: str | None) -> list[str]:
    """The types asked for, each a causal-LM type of the installed transformers; all by default."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    known = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if not names:
        return known
    types = [t.strip() for t in names.split(",") if t.strip()]
    for name in types:
        if name not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            close = difflib.get_close_matches(name, known, n=3)
            raise PlanError(f"unknown model type {name!r}: not a causal-LM type of the installed transformers"
                            + (f" (did you mean {', '.join(close)}?)" if close else "")
                            + "; `python -m tp census --help`")
    if not types:
        raise PlanError("--types names no model type; give comma-separated model types, e.g. --types llama,gpt2")
    return types


def destination(args) -> Path | None:
    """Where the table is written: ``--output``, the committed table with ``--write-docs``, or nowhere."""
    if args.write_docs and args.output:
        raise PlanError("give --output FILE or --write-docs, not both")
    if not args.write_docs:
        return Path(args.output) if args.output else None
    if args.types:
        raise PlanError(f"--write-docs rewrites the whole committed table ({COMMITTED_TABLE}); a census of "
                        "--types would drop the other rows: use --output FILE for a partial census")
    if not COMMITTED_TABLE.parent.is_dir():
        raise PlanError(f"--write-docs rewrites docs/coverage.md of a source checkout; there is no "
                        f"{COMMITTED_TABLE.parent}: use --output FILE")
    return COMMITTED_TABLE


@contextlib.contextmanager
def _quiet():
    """transformers' warnings and log lines silenced, here and in the ranks' processes."""
    import transformers

    previous, level = os.environ.get("PYTHONWARNINGS"), transformers.logging.get_verbosity()
    os.environ["PYTHONWARNINGS"] = "ignore"  # read by the ranks' processes when they start
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(level)
        if previous is None:
            os.environ.pop("PYTHONWARNINGS", None)
        else:
            os.environ["PYTHONWARNINGS"] = previous


def census(types: list[str]) -> list[Row]:
    """One row per type; a bar on stderr counts them and estimates the time left."""
    from tqdm import tqdm

    from .launch import WorkerPool

    rows, pools = [], {tp: WorkerPool(tp) for tp in SIZES}
    try:
        with _quiet(), tqdm(types, desc="census", unit="type", file=sys.stderr, dynamic_ncols=True) as bar:
            for model_type in bar:
                bar.set_postfix_str(model_type)
                began = time.time()
                rows.append(census_row(model_type, pools))
                r = rows[-1]
                bar.write(f"{model_type:28s} {r.results.get(2, 'does not build')[:70]:70s} "
                          f"{r.results.get(4, '')[:30]:30s} {time.time() - began:5.1f}s", file=sys.stderr)
    finally:
        for pool in pools.values():
            pool.close()
    return rows


def run(args) -> int:
    """``python -m tp census``: 0 when no row is wrong or an error, else 1."""
    import transformers

    types, target = model_types(args.types), destination(args)
    start = time.time()
    rows = census(types)
    seconds = time.time() - start
    text = render(rows, transformers.__version__, seconds)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    failed = [r.model_type for r in rows if r.failed]
    if args.json:
        print(json.dumps({"command": "census", "transformers": transformers.__version__, "seconds": round(seconds, 1),
                          "written_to": str(target) if target else None, "summary": summary(rows),
                          "failed": failed, "rows": [r.as_json() for r in rows]}, indent=2))
    elif target is not None:
        print(text.split("| model type")[0].rstrip() + f"\n\nwritten to {target}")
    else:
        print(text, end="")
    if failed:
        print(f"wrong or an error: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
