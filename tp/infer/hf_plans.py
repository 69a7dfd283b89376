"""transformers' own tensor-parallel plans (``config.base_model_tp_plan``, a model's ``_tp_plan``),
translated into our style names, as a second opinion on an inferred plan.

They are not trusted on their own: in transformers 5.23 some cover only the lm_head, some
shard no attention, some gather the attention output and repeat attention on every rank,
and some leave learnable parameters in the sharded region without gradient sync. The
dataflow trace decides; where a transformers plan says the same, the report says so.
"""

from __future__ import annotations

from torch import nn

from ..patterns import matches

# transformers style -> ours; a style missing here has no equivalent we would use as is.
TRANSLATION = {
    "colwise": "colwise",
    "rowwise": "rowwise",
    "packed_colwise": "colwise",
    "moe_tp_experts": "experts",
    "replicated_with_grad_allreduce": "sum_grads",
    "embedding_rowwise": "embedding",
}


def transformers_plan(model: nn.Module) -> dict[str, str]:
    """Module-name pattern -> transformers style, relative to ``model``'s own paths."""
    config = getattr(model, "config", None)
    if config is None:
        return {}
    text = getattr(config, "get_text_config", lambda: config)()
    base = dict(getattr(text, "base_model_tp_plan", None) or {})
    prefix = getattr(model, "base_model_prefix", "")
    plan = {f"{prefix}.{k}" if prefix else k: v for k, v in base.items()}
    plan.update(getattr(type(model), "_tp_plan", None) or {})
    return plan


def translated_style(plan: dict[str, str], path: str, ours: str) -> tuple[str | None, str | None]:
    """(transformers style, our name for it) for ``path``; our name is ``lm_head`` for a gathered
    output projection the model calls its lm_head (``ours``), None where we have no equivalent."""
    hits = [p for p in plan if matches(p, path)]
    if not hits:
        return None, None
    theirs = plan[max(hits, key=len)]
    if theirs == "colwise_gather_output" and ours == "lm_head":
        return theirs, "lm_head"
    return theirs, TRANSLATION.get(theirs)


def describe(plan: dict[str, str]) -> str:
    """What a transformers plan covers inside the blocks, in a few words (for the census)."""
    inside = {p: s for p, s in plan.items() if "*" in p}  # per-layer entries
    if not plan:
        return "none"
    if not inside:
        return "lm_head only"
    gathered = [p for p, s in inside.items() if s == "colwise_gather_output"]
    if any("attn" in p or "attention" in p for p in gathered):
        return "gathers attention output"
    if gathered:
        return "gathers an MLP output"
    if not any("attn" in p or "attention" in p for p in inside):
        return "no attention"
    return "full"
