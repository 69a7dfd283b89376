"""Resolve which module gets which style, and record which source decided it.

Sources, highest precedence first: ``argument``, ``environment``, ``config file``, the
family plan from the registry, then, for a model with no registered family, the built-in
lists and the structural inference. Block inputs are ``derived`` last from the result.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import nn

from .errors import PlanError
from .heads import Heads, heads_of
from .hf_plans import transformers_plan, translated_style
from .inference import Inference, expand, infer, untraced_blocks
from .overrides import Overrides
from .patterns import closest_names, matches, specificity
from .registry import Registry
from .styles import LINEAR_TYPES, StyleSpec

ROWWISE = StyleSpec("rowwise")
COLWISE = StyleSpec("colwise")
KEEP = StyleSpec("keep")
BLOCK_INPUT = StyleSpec("block_input")


@dataclass(frozen=True)
class Decision:
    module: str
    style: StyleSpec
    source: str
    pattern: str | None = None


@dataclass
class ResolvedPlan:
    family: str | None
    decisions: dict[str, Decision]
    warnings: list[str] = field(default_factory=list)
    heads: Heads | None = None
    inference: Inference | None = None  # set when the plan was inferred from the traced dataflow
    local_counts: dict[str, str] = field(default_factory=dict)  # inferred "path.attr" -> head kind
    units: dict[str, list[str]] = field(default_factory=dict)  # inferred unit key -> its module paths

    def heads_at(self, model: nn.Module, path: str) -> Heads | None:
        """The heads as the module at ``path`` sees them (its parent's own head size, if any)."""
        if self.heads is None or "." not in path:
            return self.heads
        return self.heads.at(model.get_submodule(path.rpartition(".")[0]))

    def styles(self, model: nn.Module):
        return {path: d.style.build(heads=self.heads_at(model, path), module=model.get_submodule(path))
                for path, d in self.decisions.items()}

    def with_style(self, path: str, style: StyleSpec) -> None:
        self.decisions[path] = Decision(path, style, self.decisions[path].source, self.decisions[path].pattern)


def _best_match(path: str, plan: dict[str, StyleSpec], where: str) -> tuple[str, StyleSpec] | None:
    hits = [p for p in plan if matches(p, path)]
    if not hits:
        return None
    top = max(specificity(p) for p in hits)
    best = [p for p in hits if specificity(p) == top]
    if len({plan[p] for p in best}) > 1:
        choices = ", ".join(f"{p!r} -> {plan[p]}" for p in best)
        raise PlanError(f"{where}: module {path} is matched by equally specific patterns with different styles "
                        f"({choices}); make one of them more specific")
    return best[0], plan[best[0]]


def _report_unmatched(patterns, used, paths, where, strict, problems) -> None:
    for pattern in patterns:
        if pattern in used:
            continue
        hint = closest_names(pattern, paths)
        message = f"{where}: pattern {pattern!r} matches no module" + (
            f"; closest: {', '.join(hint)}" if hint else "")
        problems.append(message)
        if strict:
            raise PlanError(message + " (strict mode)")
        warnings.warn(message, stacklevel=4)


SEQUENCE_DIM = 1  # [batch, sequence, features], as Hugging Face models hold activations
SEQUENCE_STYLES = ("rowwise", "embedding", "lm_head")


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith("Norm")


def with_sequence_parallel(plan: ResolvedPlan, model: nn.Module, registry: Registry) -> None:
    """Turn a tensor-parallel plan into a sequence-parallel one, in place.

    Between blocks the residual stream is sharded along the sequence: the row-parallel outputs
    and the embedding are reduce-scattered instead of all-reduced, each block input is
    all-gathered once (``block_input``), the lm_head gathers its input, and the norms of the
    blocks and the final norm run on sequence shards. A family's ``sequence_parallel`` table
    adds synchronisation points (``sequence_shard`` after a module) and norms.
    """
    blocks = find_blocks(model)
    if not blocks:
        raise PlanError(f"{type(model).__name__}: sequence_parallel needs repeated blocks with a sequence "
                        "dimension; none were found")
    refused = registry.inherited(plan.family, "sequence_parallel_refused") if plan.family else None
    if refused:
        raise PlanError(f"family {plan.family!r} cannot run sequence parallel: {refused}; shard it without it")
    experts = [p for p, d in plan.decisions.items() if d.style.name == "experts"]
    if experts:
        raise PlanError(f"sequence_parallel is not supported with packed experts ({experts[0]}): they see the "
                        "tokens flattened, not along a sequence dimension; shard this model without it")
    top = blocks[0].rpartition(".")[0].rpartition(".")[0]  # "model" of "model.layers.3"
    for path, decision in list(plan.decisions.items()):
        if decision.style.name in SEQUENCE_STYLES:
            args = (*decision.style.args, ("sequence_dim", SEQUENCE_DIM))
            plan.with_style(path, StyleSpec(decision.style.name, tuple(sorted(args))))
    modules = dict(model.named_modules())
    for path, module in modules.items():
        parent = path.rpartition(".")[0]
        if path and path not in plan.decisions and is_norm(module) and (parent in blocks or parent == top):
            plan.decisions[path] = Decision(path, StyleSpec("sequence_parallel"), "derived (sequence parallel)")
    points = registry.inherited(plan.family, "sequence_parallel") if plan.family else {}
    where = f"family {plan.family!r} (sequence_parallel)"
    used = set()
    for path in modules:
        hit = _best_match(path, points, where) if path else None
        if hit:
            used.add(hit[0])
            plan.decisions[path] = Decision(path, hit[1], f"family {plan.family} (sequence parallel)", hit[0])
    _report_unmatched(points, used, list(modules), where, False, plan.warnings)
    order = list(modules)
    plan.decisions = dict(sorted(plan.decisions.items(), key=lambda item: order.index(item[0])))


def find_blocks(model: nn.Module) -> list[str]:
    """Paths of the repeated blocks: the children of the largest list of modules (hybrid models
    mix block classes, attention and state-space layers, in one list). A list beside the token
    embedding is preferred: a multimodal model's audio or vision encoder may be larger than its
    text decoder in a small configuration."""
    embed = getattr(model, "get_input_embeddings", lambda: None)()
    names = {m: n for n, m in model.named_modules()}
    beside = names[embed].rpartition(".")[0] if embed in names else None
    best, best_key = None, None
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module):
            key = (path.rpartition(".")[0] == beside, sum(p.numel() for p in module.parameters()))
            if key[1] and (best_key is None or key > best_key):
                best, best_key = path, key
    if best is None:
        return []
    return [f"{best}.{i}" for i in range(len(model.get_submodule(best)))]


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


def resolve(
    model: nn.Module,
    registry: Registry,
    *,
    family: str | None = None,
    overrides: list[Overrides] = (),
    strict: bool = False,
    inference: Inference | None = None,
    units: set[str] | None = None,
) -> ResolvedPlan:
    """``inference`` reuses an earlier trace; ``units`` limits an inferred plan to those unit keys."""
    modules = dict(model.named_modules())
    del modules[""]
    paths = list(modules)
    problems: list[str] = []

    if family is not None:
        registry.get(family)
    else:
        family = registry.family_of(model)

    decisions: dict[str, Decision] = {}
    inferred = None
    if family is not None:
        plan = registry.plan(family, model)
        where = f"family {family!r}"
        used = set()
        for path in paths:
            hit = _best_match(path, plan, where)
            if hit:
                used.add(hit[0])
                decisions[path] = Decision(path, hit[1], f"family {family}", hit[0])
        _report_unmatched(plan, used, paths, where, strict, problems)
    else:
        inferred = infer_from_dataflow(model, registry, decisions, problems, inference, units)
        if inferred is None:
            decisions = infer_plan_from_names(model, registry)
            problems.append("the plan was inferred from module names only (the model has no token embedding "
                            "to trace it with); check it with tp.verify(model_factory=...)")
            warnings.warn(problems[-1], stacklevel=3)

    linears = [p for p in paths if isinstance(modules[p], LINEAR_TYPES)]
    for source in reversed(list(overrides)):
        chosen: dict[str, tuple[str, StyleSpec]] = {}
        used = set()
        for style, patterns in ((ROWWISE, source.allreduce), (KEEP, source.keep)):
            for pattern in patterns:
                for path in (p for p in linears if matches(pattern, p)):
                    used.add(pattern)
                    if path in chosen and chosen[path][1] != style:
                        raise PlanError(
                            f"{source.source}: linear {path} is listed both as all-reduce ({chosen[path][0]!r}) "
                            f"and as keep ({pattern!r}); remove it from one of the lists"
                        )
                    chosen[path] = (pattern, style)
        for path, (pattern, style) in chosen.items():
            decisions[path] = Decision(path, style, source.source, pattern)
        _report_unmatched(source.allreduce + source.keep, used, linears, f"{source.source} (linears only)",
                          strict, problems)

    for path, decision in decisions.items():
        decision.style.check_module(path, modules[path])

    block_patterns = registry.inherited(family, "block_inputs") if family else None
    if block_patterns is None:
        # A repeated block itself adds its input to the residual stream, which must stay a plain tensor.
        blocks = {p.rpartition(".")[0] for p, d in decisions.items() if d.style == COLWISE} - set(find_blocks(model))
    else:
        blocks = {p for p in paths if any(matches(b, p) for b in block_patterns)}
    for block in sorted(blocks - {""} - set(decisions), key=paths.index):
        decisions[block] = Decision(block, BLOCK_INPUT, "derived")

    ordered = {p: decisions[p] for p in paths if p in decisions}
    keys = registry.inherited(family, "heads") if family else None
    resolved = ResolvedPlan(family, ordered, problems, heads_of(getattr(model, "config", None), keys))
    if family is None and inferred is not None:
        resolved.inference, resolved.local_counts, resolved.units = inferred
    return resolved


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
    """Fill ``decisions`` from the traced dataflow (``tp/inference.py``), labelled with the source
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
