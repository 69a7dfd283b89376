"""``python -m tp census``: every causal-LM type of the installed transformers, sharded and checked.

For each model type in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``: build a tiny random model
(``tp/infer/tiny.py``) on CPU; if it builds and runs, shard it with ``tp.apply`` and no user
configuration at TP=2, and at TP=4 where its sizes allow, and compare forward and backward
with the unsharded model (``tp.verify``). Then its published-size model (the type's default
config) is planned on the meta device at TP=2, 4 and 8 (``tp.resolve`` and the size check), so
that a plan that works at tiny size but not at real size shows. Last, every registered family
among the types is swept with each config option that changes its forward turned on
(``tp/testing/flag_sweep.py``) at TP=2 and 4. The result is markdown, one row per type and one
per family, printed (``--json``: one JSON object); ``--output FILE`` writes it to a file
instead, and only ``--write-docs`` rewrites the committed ``docs/coverage.md``. The exit code is
1 when any row is wrong or an error. Progress, with a count and the time left, goes to stderr;
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
PUBLISHED_SIZES = (2, 4, 8)  # TP sizes the published-size model is planned at
MAX_PARAMS = 20_000_000
OUTCOMES = ("verified", "partial", "refused", "wrong", "error")
PUBLISHED_OUTCOMES = ("plans", "partial", "refused", "does not build", "error")
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
    published: dict[int, str] = field(default_factory=dict)  # TP size -> outcome of the published-size plan

    @property
    def status(self) -> str:
        """verified / partial / refused / wrong / error, from the TP=2 result; sizes that do not
        divide at TP=2 are a refusal too (tp.apply raises SizeError with the reason)."""
        status = self.results.get(2, "does not build").split(":")[0]
        return "refused" if status == "n/a" else status

    @property
    def published_status(self) -> str:
        """plans / partial / refused / does not build / error, from the published-size plan at TP=2."""
        return self.published.get(2, "").split(":")[0]

    @property
    def failed(self) -> bool:
        """Wrong or an error at any TP size, at tiny or published size."""
        return any(result.split(":")[0] in FAILED for result in [*self.results.values(), *self.published.values()])

    def as_json(self) -> dict:
        return {"model_type": self.model_type, "status": self.status, "plan": self.source,
                "transformers_plan": self.transformers_plan, "results": {str(k): v for k, v in self.results.items()},
                "logits": self.logits, "grad": self.grad, "per_layer": self.per_layer,
                "params_per_rank": self.params_per_rank, "note": self.note,
                "published_status": self.published_status,
                "published": {str(k): v for k, v in self.published.items()}}


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

    row = Row(model_type, published=published_plan(model_type))
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


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def published_plan(model_type: str, sizes_: tuple[int, ...] = PUBLISHED_SIZES) -> dict[int, str]:
    """TP size -> whether the published-size model of ``model_type`` (its default config, built on
    the meta device) plans: "plans"; "partial: ..." where units of an inferred plan stay whole
    (sizes that do not divide, block structures its twin did not trace); "refused: ..." with tp's
    reason; "does not build: ..." where transformers cannot build the default config; "error: ..."
    for anything else (a bug of ours). The plan is resolved once: only the size checks depend on
    the TP size."""
    from transformers import AutoConfig

    from ..checks import sizes
    from ..infer.plan import is_end_unit
    from ..infer.tiny import build
    from ..resolution import resolve

    try:
        model = build(AutoConfig.for_model(model_type), device="meta")
    except Exception as e:
        return {tp: f"does not build: {_first_line(e)}" for tp in sizes_}
    try:
        resolved = resolve(model, max(sizes_))
    except TPError as e:
        return {tp: f"refused: {str(e).strip().splitlines()[0]}" for tp in sizes_}
    except Exception as e:
        return {tp: f"error: {_first_line(e)}" for tp in sizes_}
    if resolved.inconsistencies:  # tp made a plan whose styles do not fit together
        return {tp: f"error: the plan is inconsistent: {resolved.inconsistencies[0]}" for tp in sizes_}
    whole = [w for w in resolved.warnings if "stays whole" in w]
    found = {}
    for tp in sizes_:
        if not resolved.units:  # a family's plan: every size must divide
            lines = sizes.problems(model, resolved, tp)[0]
            found[tp] = f"refused: {lines[0]}" if lines else f"partial: {whole[0]}" if whole else "plans"
            continue
        dropped = sizes.unit_problems(model, resolved, tp)  # tp.apply keeps these units whole
        blocks = [key for key in resolved.units if not is_end_unit(key)]
        if blocks and all(key in dropped for key in blocks):
            found[tp] = f"refused: {dropped[blocks[0]]}"
        elif dropped or whole:
            found[tp] = "partial: " + "; ".join([*whole, *(f"{key} stays whole: {why}" for key, why in dropped.items())])
        else:
            found[tp] = "plans"
    return found


def _published_cell(published: dict[int, str]) -> tuple[str, list[str]]:
    """The published-size column (the TP sizes that plan, or the outcome) and its notes."""
    if not published:
        return "", []
    working = [tp for tp, result in published.items() if result.split(":")[0] in ("plans", "partial")]
    partial = any(result.startswith("partial") for result in published.values())
    cell = ("TP " + ", ".join(map(str, working)) + (" (part)" if partial else "")) if working else \
        published[min(published)].split(":")[0]
    reasons = dict.fromkeys(result.partition(": ")[2] for result in published.values() if ": " in result)
    return cell, [f"published size: {reason}" for reason in reasons]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def summary(rows: list[Row]) -> dict[str, int]:
    """How many types there are, how many build, and how many of those had each outcome at TP=2."""
    built = [r for r in rows if r.results]
    return {"model_types": len(rows), "build": len(built), **{s: sum(r.status == s for r in built) for s in OUTCOMES}}


def published_summary(rows: list[Row]) -> dict[str, int]:
    """How many types' published-size models had each outcome at TP=2, and how many plan at every
    size of PUBLISHED_SIZES."""
    planned = [r for r in rows if r.published]
    every = sum(all(v.split(":")[0] in ("plans", "partial") for v in r.published.values()) for r in planned)
    return {"model_types": len(planned), **{s: sum(r.published_status == s for r in planned) for s in PUBLISHED_OUTCOMES},
            "every_size": every}


@dataclass
class FamilySweep:
    """One registered family's flag sweep: TP size -> one case per option."""

    family: str
    model_types: list[str]
    cases: dict[int, list] = field(default_factory=dict)  # TP size -> [flag_sweep.Case]

    def outcomes(self) -> dict[str, tuple[str, str]]:
        """option=value -> (outcome over every TP size, reason): wrong or refused at any size wins."""
        found: dict[str, tuple[str, str]] = {}
        rank = {"wrong": 0, "refused": 1, "skipped": 2, "verified": 3}
        for tp, cases in self.cases.items():
            for case in cases:
                key = f"{case.option}={case.value}"
                reason = f"TP={tp}: {case.reason}" if case.outcome in ("wrong", "refused") else case.reason
                if key not in found or rank[case.outcome] < rank[found[key][0]]:
                    found[key] = (case.outcome, reason)
        return found

    @property
    def failed(self) -> bool:
        return any(outcome == "wrong" for outcome, _ in self.outcomes().values())

    def as_json(self) -> dict:
        return {"family": self.family, "model_types": self.model_types,
                "options": {key: {"outcome": o, "reason": r} for key, (o, r) in self.outcomes().items()}}


SWEEP_OUTCOMES = ("verified", "refused", "skipped", "wrong")


def sweep_summary(sweeps: list[FamilySweep]) -> dict[str, int]:
    outcomes = [o for s in sweeps for o, _ in s.outcomes().values()]
    return {"families": len(sweeps), "options": len(outcomes), **{o: outcomes.count(o) for o in SWEEP_OUTCOMES}}


def render(rows: list[Row], transformers_version: str, seconds: float, sweeps: list[FamilySweep] = ()) -> str:
    counts, published, swept = summary(rows), published_summary(rows), sweep_summary(list(sweeps))
    correct, built = counts["verified"] + counts["partial"], counts["build"]
    lines = [
        "# Coverage: every causal-LM type of transformers, sharded with no configuration",
        "",
        f"Written by `python -m tp census --write-docs` (transformers {transformers_version}, {seconds / 60:.0f} min on 2 CPU cores).",
        "Three checks, each generated by the census:",
        "",
        "1. **Verified at tiny default sizes.** Each tiny random model (`tp/infer/tiny.py`: the type's default",
        "   config with tiny widths, every other option at its default) is sharded with `tp.apply(model, mesh)` and",
        "   nothing else, over CPU gloo processes, and compared with the unsharded model: logits max abs diff <= 1e-5,",
        "   every gradient <= 1e-4 relative, gathered parameters bit-exact, collectives as the plan predicts.",
        "2. **Planned at published size.** The type's default config at its published size, built on the meta device,",
        f"   is planned (`tp.resolve` and the size check, as `tp.apply` does before sharding) at TP="
        f"{', '.join(map(str, PUBLISHED_SIZES))}: widths that coincide",
        "   at tiny size may differ at real size. Nothing runs there; a plan inferred for it is traced on a tiny twin.",
        "3. **Verified with the published configs' flags.** Each registered family's tiny model, with each config",
        "   option that changes its forward turned on (QKV clipping, biases, q/k norms, sliding windows, soft-capping,",
        f"   multipliers, ...), one at a time, sharded and compared as in 1 at TP={' and '.join(map(str, SIZES))}"
        " (`tp/testing/flag_sweep.py`).",
        "",
        f"- model types: {len(rows)}; build and run on CPU at tiny size: {built}",
        (f"- verified correct at tiny default sizes at TP=2, forward and backward: **{correct} of {built} "
         f"({100 * correct / max(built, 1):.0f}%)**; {counts['verified']} with every block unit sharded, "
         f"{counts['partial']} with some units kept whole (see notes)"),
        f"- refused with a reason: {counts['refused']}; wrong results: {counts['wrong']}; errors: {counts['error']}",
        (f"- planned at published size on the meta device at TP=2: **{published['plans'] + published['partial']} of "
         f"{published['model_types']}** ({published['plans']} with every unit sharded, {published['partial']} with some "
         f"kept whole); at every TP of {', '.join(map(str, PUBLISHED_SIZES))}: {published['every_size']}; refused with a "
         f"reason: {published['refused']}; default config does not build in transformers: {published['does not build']}; "
         f"errors: {published['error']}"),
    ]
    if swept["families"]:
        lines.append(
            f"- verified with the published configs' flags: {swept['families']} registered families, {swept['options']} "
            f"options: **{swept['verified']} verified** at TP={' and '.join(map(str, SIZES))}, {swept['refused']} refused "
            f"with a reason, {swept['skipped']} skipped (the unsharded model does not run with the option); "
            f"wrong results: {swept['wrong']}")
    lines += [
        "",
        "## Every type: at tiny default sizes, and planned at published size",
        "",
        "Columns: *plan* is the source that decided (a registry family; the dataflow trace, confirmed by",
        "transformers' own plan where it says the same; or the trace alone). *transformers plan* is what",
        "`base_model_tp_plan` covers. *TP=2*, *TP=4*: the tiny model. *published size*: the TP sizes at which the",
        "published-size model plans ((part): some units stay whole), or why not. *per layer* is collectives per",
        "block, forward / backward. *params* is the fraction of parameter bytes each rank holds at TP=2.",
        "",
        "| model type | plan | transformers plan | TP=2 | TP=4 | published size | logits | grad (rel) | per layer | "
        "params | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        published_cell, published_notes = _published_cell(r.published)
        if not r.results:
            note = "; ".join([r.note, *published_notes])
            lines.append(f"| {r.model_type} | | | does not build | | {published_cell} | | | | | {_cell(note)} |")
            continue
        tp2, tp4 = r.results.get(2, ""), r.results.get(4, "")
        reasons = [text.partition(": ")[2] for text in (tp2, tp4) if ":" in text]
        note = "; ".join(dict.fromkeys([*reasons, *([r.note] if r.note else []), *published_notes]))  # each reason once
        logits = f"{r.logits:.1e}" if r.logits is not None else ""
        grad = f"{r.grad:.1e}" if r.grad is not None else ""
        lines.append(f"| {r.model_type} | {r.source} | {r.transformers_plan} | {tp2.split(':')[0]} | "
                     f"{tp4.split(':')[0]} | {published_cell} | {logits} | {grad} | {r.per_layer} | {r.params_per_rank} | "
                     f"{_cell(note)} |")
    if sweeps:
        lines += [
            "",
            "## Registered families with the published configs' flags",
            "",
            "Each option is turned on alone in the family's tiny test config. *verified*: exact at every TP size;",
            "*refused*: tp refuses it before it runs, with the reason in the notes; *skipped*: the unsharded model",
            "does not run with the option alone (it needs other settings).",
            "",
            "| family | model types | verified | refused | skipped | wrong | notes |",
            "|---|---|---|---|---|---|---|",
        ]
        for sweep in sweeps:
            by_outcome = {o: [k for k, (found, _) in sweep.outcomes().items() if found == o] for o in SWEEP_OUTCOMES}
            notes = "; ".join(f"{k}: {why}" for k, (o, why) in sweep.outcomes().items() if o != "verified")
            lines.append(f"| {sweep.family} | {', '.join(sweep.model_types)} | "
                         + " | ".join(_cell(", ".join(by_outcome[o])) for o in SWEEP_OUTCOMES) + f" | {_cell(notes)} |")
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


def swept_families(rows: list[Row]) -> dict[str, list[str]]:
    """Registered family -> the census types it planned, for the families the flag sweep covers."""
    from . import flag_sweep

    known, found = set(flag_sweep.families()), {}
    for row in rows:
        family = row.source[len("registry ("):-1] if row.source.startswith("registry (") else None
        if family in known:
            found.setdefault(family, []).append(row.model_type)
    return found


def census(types: list[str]) -> tuple[list[Row], list[FamilySweep]]:
    """One row per type, then the flag sweep of the registered families among them; bars on
    stderr count them and estimate the time left."""
    from tqdm import tqdm

    from . import flag_sweep
    from .launch import WorkerPool

    rows, sweeps, pools = [], [], {tp: WorkerPool(tp) for tp in SIZES}
    try:
        with _quiet():
            with tqdm(types, desc="census", unit="type", file=sys.stderr, dynamic_ncols=True) as bar:
                for model_type in bar:
                    bar.set_postfix_str(model_type)
                    began = time.time()
                    rows.append(census_row(model_type, pools))
                    r = rows[-1]
                    bar.write(f"{model_type:28s} {r.results.get(2, 'does not build')[:60]:60s} "
                              f"{r.results.get(4, '')[:20]:20s} {r.published.get(2, '')[:30]:30s} "
                              f"{time.time() - began:5.1f}s", file=sys.stderr)
            families = swept_families(rows)
            with tqdm(families.items(), desc="flags", unit="family", file=sys.stderr, dynamic_ncols=True) as bar:
                for family, family_types in bar:
                    bar.set_postfix_str(family)
                    sweeps.append(FamilySweep(family, family_types,
                                              {tp: flag_sweep.sweep(family, pools[tp]) for tp in SIZES}))
    finally:
        for pool in pools.values():
            pool.close()
    return rows, sweeps


def run(args) -> int:
    """``python -m tp census``: 0 when no row is wrong or an error, else 1."""
    import transformers

    types, target = model_types(args.types), destination(args)
    start = time.time()
    rows, sweeps = census(types)
    seconds = time.time() - start
    text = render(rows, transformers.__version__, seconds, sweeps)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    failed = [r.model_type for r in rows if r.failed] + [f"{s.family} (flags)" for s in sweeps if s.failed]
    if args.json:
        print(json.dumps({"command": "census", "transformers": transformers.__version__, "seconds": round(seconds, 1),
                          "written_to": str(target) if target else None, "summary": summary(rows),
                          "published_summary": published_summary(rows), "flag_summary": sweep_summary(sweeps),
                          "failed": failed, "rows": [r.as_json() for r in rows],
                          "flag_sweeps": [s.as_json() for s in sweeps]}, indent=2))
    elif target is not None:
        print(text.split("| model type")[0].rstrip() + f"\n\nwritten to {target}")
    else:
        print(text, end="")
    if failed:
        print(f"wrong or an error: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
