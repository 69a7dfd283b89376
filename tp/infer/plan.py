"""Decisions for a model no registry family claims: from its traced dataflow, or, for a model
that cannot be traced, from its module names (DeepSpeed AutoTP's rule)."""

from __future__ import annotations

from torch import nn

from ..errors import PlanError
from ..patterns import matches
from ..plan.registry import Registry
from ..plan.resolved import Decision
from ..plan.structure import find_blocks
from ..styles import StyleSpec
from ..styles.linear import LINEAR_TYPES
from .hf_plans import transformers_plan, translated_style
from .inference import Inference, expand, infer, untraced_blocks

ROWWISE = StyleSpec("rowwise")
COLWISE = StyleSpec("colwise")
KEEP = StyleSpec("keep")


def infer_plan_from_names(model: nn.Module, registry: Registry) -> dict[str, Decision]:
    """For a model that cannot be traced (no token embedding to feed): DeepSpeed AutoTP's rule: per sub-block of each repeated block, the linear that feeds the
    residual stream (a built-in all-reduce name, else the last linear) is row-parallel, the
    keep list stays whole, every other linear is column-parallel."""
    blocks = find_blocks(model)
    if not blocks:
        raise PlanError(
            f"{type(model).__name__}: no family in the registry recognises it and no repeated blocks were "
            "found to infer a plan from; add a family to registry.toml (README: 'Contributing a family')"
        )
    decisions: dict[str, Decision] = {}
    for block in blocks:
        groups: dict[str, list[str]] = {}
        for path, module in model.get_submodule(block).named_modules():
            if isinstance(module, LINEAR_TYPES):
                groups.setdefault(path.split(".")[0] if "." in path else "", []).append(f"{block}.{path}")
        for linears in groups.values():
            for path in linears:
                if any(matches(p, path) for p in registry.keep_linear_items):
                    decisions[path] = Decision(path, KEEP, "built-in list")
                elif any(matches(p, path) for p in registry.allreduce_linear_items):
                    decisions[path] = Decision(path, ROWWISE, "built-in list")
            sharded = [p for p in linears if p not in decisions]
            if sharded and not any(p in decisions and decisions[p].style == ROWWISE for p in linears):
                decisions[sharded[-1]] = Decision(sharded[-1], ROWWISE, "inferred")
            for path in sharded:
                decisions.setdefault(path, Decision(path, COLWISE, "inferred"))
    names = {m: n for n, m in model.named_modules()}
    # Hugging Face models say which modules are their embeddings; plain modules may not.
    embed = getattr(model, "get_input_embeddings", lambda: None)()
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if isinstance(embed, nn.Embedding):
        decisions[names[embed]] = Decision(names[embed], StyleSpec("embedding"), "inferred")
    if isinstance(head, nn.Linear):
        decisions[names[head]] = Decision(names[head], StyleSpec("lm_head"), "inferred")
    return decisions


END_UNITS = ("embedding: ", "lm_head: ", "embedding and lm_head: ")


def end_units(model: nn.Module, inference: Inference) -> dict[str, list[tuple[str, str]]]:
    """Unit key -> (style, path) of the embedding and the lm_head in an inferred plan: one unit
    when they share their weight (which needs one layout), else one each."""
    ends = [(style, path) for style, path in (("embedding", inference.embedding), ("lm_head", inference.lm_head))
            if path]
    if len(ends) == 2 and model.get_submodule(ends[0][1]).weight is model.get_submodule(ends[1][1]).weight:
        return {f"{END_UNITS[2]}{ends[0][1]}, {ends[1][1]}": ends}
    return {f"{style}: {path}": [(style, path)] for style, path in ends}


def is_end_unit(key: str) -> bool:
    return key.startswith(END_UNITS)


INFERRED = "inferred (dataflow)"
CONFIRMED = "transformers plan (dataflow agrees)"


def infer_from_dataflow(model: nn.Module, registry: Registry, decisions: dict[str, Decision],
                        problems: list[str], inference: Inference | None = None,
                        units: set[str] | None = None
                        ) -> tuple[Inference, dict[str, str], dict[str, list[str]]] | None:
    """Fill ``decisions`` from the traced dataflow (``tp/infer/inference.py``), labelled with the source
    that decided: the trace alone, or a transformers plan that says the same. Returns the
    inference, the head-count attributes to set, and each unit's module paths; None when the
    model cannot be traced."""
    blocks = find_blocks(model)
    if not blocks:
        raise PlanError(
            f"{type(model).__name__}: no family in the registry recognises it and no repeated blocks were "
            "found to infer a plan from; add a family to registry.toml (README: 'Contributing a family')")
    inference = inference or infer(model, blocks, registry.keep_linear_items)
    if inference is None:
        return None
    if inference.problems:
        raise PlanError(f"{type(model).__name__}: no family in the registry recognises it, and its plan cannot be "
                        f"inferred: {'; '.join(inference.problems)}. Add a family to registry.toml")
    styles, counts, unit_paths = expand(model, blocks, inference, units)
    if not styles and units is None:
        reasons = "; ".join(f"{m}: {why}" for m, why in list(inference.kept.items())[:6])
        raise PlanError(f"{type(model).__name__}: no family in the registry recognises it, and no part of its blocks "
                        f"can be sharded safely ({reasons}). Add a family to registry.toml, or use data parallelism")
    # the ends are units too: a model may read its embedding's weight outside the embedding (Gemma 4)
    for key, ends in end_units(model, inference).items():
        if units is None or key in units:
            styles.update({path: StyleSpec(style) for style, path in ends})
            unit_paths[key] = [path for _, path in ends]
    theirs = transformers_plan(model)
    for path, style in styles.items():
        original, translated = translated_style(theirs, path, style.name)
        source = CONFIRMED if translated == style.name else INFERRED
        if original and translated != style.name:
            source += f"; transformers plan says {original}"
        decisions[path] = Decision(path, style, source)
    for path in untraced_blocks(model, blocks, inference):
        problems.append(f"{path} has a structure the trace of {inference.traced} did not see; it stays whole")
    return inference, counts, unit_paths
