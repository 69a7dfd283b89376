"""``python -m tp census``: every causal-LM type of the installed transformers, sharded and checked.

For each model type in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``: build a tiny random model
(``tp/infer/tiny.py``) on CPU; if it builds and runs, shard it with ``tp.apply`` and no user
configuration at TP=2, and at TP=4 where its sizes allow, and compare forward and backward
with the unsharded model (``tp.verify``). The result is a markdown table, one row per type,
written to ``docs/coverage.md``.
"""

from __future__ import annotations

import argparse
import functools
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TPError
from .launch import WorkerError, WorkerPool

SIZES = (2, 4)
MAX_PARAMS = 20_000_000


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
    from ..resolve import resolve

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


def render(rows: list[Row], transformers_version: str, seconds: float) -> str:
    built = [r for r in rows if r.results]
    counts = {s: sum(r.status == s for r in built) for s in ("verified", "partial", "refused", "wrong", "error")}
    correct = counts["verified"] + counts["partial"]
    lines = [
        "# Coverage: every causal-LM type of transformers, sharded with no configuration",
        "",
        f"Written by `python -m tp census` (transformers {transformers_version}, {seconds / 60:.0f} min on 2 CPU cores).",
        "Each tiny random model (`tp/infer/tiny.py`) is sharded with `tp.apply(model, mesh)` and nothing else, over",
        "CPU gloo processes, and compared with the unsharded model: logits max abs diff <= 1e-5, every",
        "gradient <= 1e-4 relative, gathered parameters bit-exact, collectives as the plan predicts.",
        "",
        f"- model types: {len(rows)}; build and run on CPU: {len(built)}",
        (f"- verified correct at TP=2, forward and backward: **{correct} of {len(built)} "
         f"({100 * correct / max(len(built), 1):.0f}%)**; {counts['verified']} with every block unit sharded, "
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tp census", description=__doc__.splitlines()[0])
    parser.add_argument("--types", default=None, help="comma-separated model types (default: all)")
    parser.add_argument("--output", default="docs/coverage.md", help="where to write the table")
    args = parser.parse_args(argv)
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = args.types.split(",") if args.types else sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    warnings.filterwarnings("ignore")
    start, rows = time.time(), []
    pools = {tp: WorkerPool(tp) for tp in SIZES}
    try:
        for model_type in types:
            began = time.time()
            rows.append(census_row(model_type, pools))
            r = rows[-1]
            print(f"{model_type:28s} {r.results.get(2, 'does not build')[:70]:70s} "
                  f"{r.results.get(4, '')[:30]:30s} {time.time() - began:5.1f}s", flush=True)
    finally:
        for pool in pools.values():
            pool.close()
    text = render(rows, transformers.__version__, time.time() - start)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(text.split("| model type")[0])
    return 0
