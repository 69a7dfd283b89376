"""A plan for a model no registry family knows, inferred from its traced dataflow.

The trace runs on a *twin*: the model itself when it is small and on a real device, else a
tiny model of the same type built from its config. Each block structure's units
(``tp/infer/dataflow.py``) become plan decisions for every block of that structure in the model.
Every unit carries a key (block class, row-parallel module) so that ``tp/trial.py`` can try
units one by one and drop those that do not reproduce the unsharded model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import PlanError
from ..patterns import matches
from ..plan.structure import find_blocks
from ..sharding.heads import Heads, heads_of
from ..styles import StyleSpec
from ..styles.experts import expert_layouts
from .dataflow import BlockFlow, Unit, block_signature, plan_block, trace_blocks

TWIN_MAX_PARAMS = 50_000_000  # larger models are traced through a tiny model of the same type
TRACE_TOKENS = 8


@dataclass
class InferredUnit:
    key: str  # "LlamaDecoderLayer: self_attn.o_proj"
    styles: dict[str, StyleSpec]  # block-relative path -> style
    local_heads: dict[str, str]  # block-relative "path.attr" -> q | kv | groups | q_features


@dataclass
class Inference:
    units: dict[tuple, list[InferredUnit]]  # block signature -> its units
    kept: dict[str, str]  # "BlockClass: module" -> why it stays whole
    traced: str  # what was traced: "the model itself" or "a tiny LlamaForCausalLM"
    twin: nn.Module | None = field(default=None, repr=False)  # the traced model, for tp/trial.py
    embedding: str | None = None
    lm_head: str | None = None
    problems: list[str] = field(default_factory=list)


def twin_of(model: nn.Module) -> tuple[nn.Module, str] | None:
    """A model to trace: ``model`` itself if small and real, else a tiny one of its class with the
    flags of its config (and without the parts its config switches off). None when the model has
    no transformers config; PlanError when no tiny model of its class builds."""
    params = list(model.parameters())
    small = sum(p.numel() for p in params) <= TWIN_MAX_PARAMS
    if small and params and all(p.device.type != "meta" for p in params):
        return model, "the model itself"
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "model_type", None):
        return None
    from .flags import flags_of
    from .tiny import build, causal_lm_type, switched_off, tiny_config

    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    flags, off = flags_of(config), switched_off(text)
    failures = []
    for settings in ({**off, **flags}, off, {}):  # a flag the tiny sizes cannot take: the twin without it
        try:
            tiny = tiny_config(causal_lm_type(config.model_type), **settings)
            # the model's own class with a config of its own class (Emu3's causal LM takes the text
            # config of its composite), else what the Auto class builds from the tiny config
            own = tiny if type(tiny) is type(config) else tiny.get_text_config(decoder=True)
            twin = build(own, model_class=type(model)) if type(own) is type(config) and \
                hasattr(type(model), "_from_config") else build(tiny)
        except Exception as e:
            failures.append(f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}")
        else:
            shown = ", ".join(f"{k}={v}" for k, v in settings.items() if k in flags)
            return twin, f"a tiny {type(twin).__name__}{f' with {shown}' if shown else ''}"
    raise PlanError(f"{type(model).__name__}: no tiny model of its type builds to trace or try its plan on "
                    f"({failures[-1]}); check it with tp.verify(model_factory=...) on a small model")


def _trace_input(model: nn.Module):
    embed = getattr(model, "get_input_embeddings", lambda: None)()
    if not isinstance(embed, nn.Embedding):
        return None
    device = embed.weight.device
    ids = (torch.arange(TRACE_TOKENS, device=device) * 7 + 3) % embed.num_embeddings
    return lambda: model(input_ids=ids[None])


@dataclass
class Trace:
    """The dataflow of each block structure of a model, traced on its twin."""

    twin: nn.Module
    traced: str  # "the model itself" or "a tiny LlamaForCausalLM"
    flows: dict[tuple, BlockFlow]  # block signature -> what its trace found
    blocks: list[str]  # the twin's blocks
    error: str | None = None  # why the twin's forward failed, if it did


def trace(model: nn.Module) -> Trace | None:
    """Trace ``model`` (or its twin); None when it cannot be traced (no twin, no token embedding)."""
    found = twin_of(model)
    if found is None:
        return None
    twin, traced = found
    run = _trace_input(twin)
    if run is None:
        return None
    twin_blocks = find_blocks(twin)
    was_training = twin.training
    twin.eval()
    try:
        flows = trace_blocks(twin, twin_blocks, run)
    except Exception as e:  # the twin's own forward failed
        return Trace(twin, traced, {}, twin_blocks, f"tracing {traced} failed: {type(e).__name__}: {e}")
    finally:
        twin.train(was_training)
    return Trace(twin, traced, flows, twin_blocks)


def infer(model: nn.Module, blocks: list[str], keep_patterns: list[str]) -> Inference | None:
    """Trace ``model`` (or its twin) and return its units; None when it cannot be traced."""
    found = trace(model)
    if found is None:
        return None
    twin, traced, flows, twin_blocks = found.twin, found.traced, found.flows, found.blocks
    if found.error:  # the twin's own forward failed: nothing to infer from
        return Inference({}, {}, traced, twin, problems=[found.error])
    heads = heads_of(getattr(twin, "config", None))
    by_signature = {block_signature(twin.get_submodule(b)): b for b in reversed(twin_blocks)}
    units, kept = {}, {}
    for signature, flow in flows.items():
        path = by_signature[signature]
        block = twin.get_submodule(path)
        keep = {rel for rel in flow.nodes if any(matches(p, f"{path}.{rel}") for p in keep_patterns)}
        plan = plan_block(flow, keep)
        name = type(block).__name__
        kept.update({f"{name}: {rel}": why for rel, why in plan.kept.items()})
        units[signature] = []
        for unit in plan.units:
            inferred = _styles(block, name, unit, heads)
            if isinstance(inferred, str):
                kept[f"{name}: {unit.row}"] = inferred
            else:
                units[signature].append(inferred)
    seen = {block_signature(twin.get_submodule(b)) for b in twin_blocks}
    unseen = {}  # a block structure the twin has not, or whose forward the trace did not run
    for path in blocks:
        unseen.setdefault(block_signature(model.get_submodule(path)), path)
    for signature, path in unseen.items():
        if signature not in units:
            kept[f"{type(model.get_submodule(path)).__name__}: {path}"] = _unseen(signature, seen, traced)
    return Inference(units, kept, traced, twin, *_ends(twin))


def _unseen(signature: tuple, seen: set[tuple], traced: str) -> str:
    """Why a block structure has no units: the trace did not run it, or the twin has no such block."""
    if signature in seen:
        return f"the trace of {traced} with token ids does not run this block"
    nearest = set(min(seen, key=lambda other: len(set(other) ^ set(signature)), default=()))
    here = [f"{path or 'the block'} {kind}" for path, kind in signature if (path, kind) not in nearest][:2]
    there = [f"{path or 'the block'} {kind}" for path, kind in nearest - set(signature)][:2]
    return (f"{traced} has no block of this structure (its config builds parts a tiny config does not, or the "
            f"model changes its modules in its forward): here {', '.join(here) or 'nothing more'}; in the twin "
            f"{', '.join(sorted(there)) or 'nothing more'}")


def _plain(module: nn.Module | None, kind: type) -> bool:
    """A ``kind`` module with only its own weight (and bias): an embedding that also normalises
    (Inkling's) stays whole; one that scales its output (Gemma's) does not need to."""
    return isinstance(module, kind) and \
        [n for n, _ in module.named_parameters()] in (["weight"], ["weight", "bias"])


def _ends(model: nn.Module) -> tuple[str | None, str | None]:
    names = {m: n for n, m in model.named_modules()}
    embed = getattr(model, "get_input_embeddings", lambda: None)()
    head = getattr(model, "get_output_embeddings", lambda: None)()
    embedding = names.get(embed) if _plain(embed, kind=nn.Embedding) else None
    lm_head = names.get(head) if _plain(head, kind=nn.Linear) else None
    if embedding is None and lm_head and embed is not None and head.weight is embed.weight:
        lm_head = None  # a tied weight needs one layout, and the embedding keeps it whole
    return embedding, lm_head


def _out_features(module: nn.Module) -> int:
    return getattr(module, "out_features", None) or module.weight.shape[-1]  # GPT-2's Conv1D: [in, out]


def _in_features(module: nn.Module) -> int:
    return getattr(module, "in_features", None) or module.weight.shape[0]


def _column_style(module: nn.Module, split: tuple[int, ...] | None, heads: Heads | None) -> StyleSpec | None:
    """colwise, with the layout of a fused output when the trace saw it cut into parts."""
    out = _out_features(module)
    if split:
        if len(set(split)) == 1:
            return StyleSpec("colwise", (("parts", len(split)),))
        if heads is None:
            return None
        names = {heads.q * heads.dim: "q", heads.kv * heads.dim: "kv"}
        if heads.q == heads.kv or any(size not in names for size in split):
            return None
        return StyleSpec("colwise", (("parts", tuple(names[s] for s in split)),))
    if heads and heads.kv != heads.q and out == heads.kv * heads.dim:
        return StyleSpec("colwise", (("parts", ("kv",)),))
    return StyleSpec("colwise")


def _styles(block: nn.Module, block_name: str, unit: Unit, heads: Heads | None) -> InferredUnit | str:
    """The unit's styles, or why it stays whole."""
    key = f"{block_name}: {unit.row}"
    styles = {unit.row: StyleSpec("experts") if unit.columns == () else StyleSpec("rowwise")}
    if unit.columns == ():
        try:
            expert_layouts(block.get_submodule(unit.row))
        except NotImplementedError as e:
            return str(e).split(";")[0]
    for col in unit.columns:
        owner = col.rpartition(".")[0]
        local = heads.at(block.get_submodule(owner)) if heads and owner else heads
        style = _column_style(block.get_submodule(col), unit.splits.get(col), local)
        if style is None:
            return f"the trace saw {col}'s output cut into parts {unit.splits.get(col)} that are not query / key-value heads"
        styles[col] = style
    owners: dict[str, list[str]] = {}
    for param in unit.grad_sums:
        owner, _, name = param.rpartition(".")
        owners.setdefault(owner, []).append(name)
    # widths of the evenly sharded tensors in this unit: a norm of that many features spans them all
    widths = {_in_features(block.get_submodule(unit.row))} if unit.columns else set()
    # (kv heads fewer than the ranks are replicated, not split: the trial rejects the norm there)
    even = (StyleSpec("colwise"), StyleSpec("colwise", (("parts", ("kv",)),)))
    widths |= {_out_features(block.get_submodule(c)) for c in unit.columns if styles[c] in even}
    if heads:  # a norm over one head's features (Qwen3's q_norm) is shared by the heads: sum_grads
        widths.discard(heads.dim)
    for owner, names in owners.items():
        module = block.get_submodule(owner)
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if sorted(names) == sorted(own) and all(getattr(module, n).dim() == 1 and len(getattr(module, n)) in widths
                                                 for n in names):
            styles[owner] = StyleSpec("gathered_norm")
        elif heads and owner == unit.row.rpartition(".")[0] and all(
                getattr(module, n).dim() == 1 and len(getattr(module, n)) == heads.q for n in names):
            # one value per head on the attention module itself (GPT-OSS sinks), not a norm's weight
            styles[owner] = StyleSpec("shard_rows", (("params", tuple(sorted(names))),))
        else:
            styles[owner] = StyleSpec("sum_grads") if sorted(names) == sorted(own) else \
                StyleSpec("sum_grads", (("params", tuple(sorted(names))),))
    return InferredUnit(key, styles, _local_heads(block, unit, heads))


FEATURE_NAMES = ("embed_dim", "all_head_size", "inner_dim", "hidden_size_per_partition")


def _local_heads(block: nn.Module, unit: Unit, heads: Heads | None) -> dict[str, str]:
    """Head counts the attention module keeps as attributes, which its forward may read."""
    if heads is None or not unit.columns:
        return {}
    owner = unit.row.rpartition(".")[0]
    if not owner:  # a row-parallel linear of the block itself: the block's other modules are not this unit's
        return _head_attributes(block, "", heads)
    found = {}
    # the attention module and its helpers (a forget gate that reshapes by heads), not its linears
    for sub, module in block.get_submodule(owner).named_modules(prefix=owner):
        if not isinstance(module, nn.Linear):
            found.update(_head_attributes(module, sub, heads))
    return found


def _head_attributes(module: nn.Module, path: str, heads: Heads) -> dict[str, str]:
    found = {}
    for attr, value in vars(module).items():
        if not isinstance(value, int) or isinstance(value, bool) or attr.startswith("_"):
            continue
        lowered = attr.lower()
        prefix = f"{path}.{attr}" if path else attr
        if "group" in lowered and heads.kv and value == heads.q // heads.kv and heads.q != heads.kv:
            found[prefix] = "groups"
        elif "head" in lowered and "dim" not in lowered and "size" not in lowered:
            if value == heads.q:
                found[prefix] = "kv" if ("kv" in lowered or "key_value" in lowered) else "q"
            elif value == heads.kv:
                found[prefix] = "kv"
        elif lowered in FEATURE_NAMES and value == heads.q * heads.dim:
            found[prefix] = "q_features"
    # in an attention module (one that keeps head counts), hidden_size may size the query (DBRX)
    size = getattr(module, "hidden_size", None)
    if found and isinstance(size, int) and size == heads.q * heads.dim:
        found[f"{path}.hidden_size" if path else "hidden_size"] = "q_features"
    return found


def expand(model: nn.Module, blocks: list[str], inference: Inference, enabled: set[str] | None = None
           ) -> tuple[dict[str, StyleSpec], dict[str, str], dict[str, list[str]]]:
    """Styles and local head counts for every block of ``model``, from the twin's units.

    Returns (path -> style, "path.attr" -> head kind, unit key -> paths it decided), for the
    units in ``enabled`` (default: all)."""
    styles: dict[str, StyleSpec] = {}
    counts: dict[str, str] = {}
    claimed: dict[str, list[str]] = {}
    for path in blocks:
        block = model.get_submodule(path)
        for unit in inference.units.get(block_signature(block), []):
            if enabled is not None and unit.key not in enabled:
                continue
            for rel, style in unit.styles.items():
                styles[f"{path}.{rel}"] = style
                claimed.setdefault(unit.key, []).append(f"{path}.{rel}")
            counts.update({f"{path}.{rel}": kind for rel, kind in unit.local_heads.items()})
    return styles, counts, claimed


def untraced_blocks(model: nn.Module, blocks: list[str], inference: Inference) -> list[str]:
    return [b for b in blocks if block_signature(model.get_submodule(b)) not in inference.units]


