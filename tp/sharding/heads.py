"""Attention head counts read from a model config, and the per-rank counts after sharding."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from .layouts import Layout, Part
from .tags import computes_split

Q_KEYS = ("num_attention_heads", "n_head", "num_heads", "n_heads")
KV_KEYS = ("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num")


@dataclass(frozen=True)
class Heads:
    """Query heads, key/value heads and the features of one head."""

    q: int
    kv: int
    dim: int

    def by_need(self, tp: int) -> bool:
        """Whether each rank holds the kv head of each of its query heads (one per query head),
        because the kv heads neither split over ``tp`` nor divide it (``Part.by_need``)."""
        return Part(self.kv, self.dim, replicable=True, serves=self.q).by_need(tp)

    def balanced(self, tp: int) -> bool:
        """Whether the query heads split unevenly, balanced (``Part.balances``); their kv heads are
        then held by need."""
        return Part(self.q, self.dim, balanced=True).balances(tp)

    def query_layout(self, unit_rows: int) -> Layout:
        """The query heads as one part of ``unit_rows`` rows each (a head's features, or its one value),
        split balanced where they do not divide."""
        return Layout((Part(self.q, unit_rows, name="heads", unit="heads", balanced=True),))

    def local(self, tp: int, rank: int = 0) -> Heads:
        """Heads on rank ``rank``: kv heads are replicated when there are fewer of them than ranks,
        and held one per query head when they neither split nor divide the ranks; query heads split
        balanced give the first ``q % tp`` ranks one more, each with its kv head held by need."""
        if self.balanced(tp):
            held = self.q // tp + (rank < self.q % tp)
            return Heads(held, held, self.dim)
        if self.by_need(tp):
            return Heads(self.q // tp, self.q // tp, self.dim)
        return Heads(self.q // tp, max(self.kv // tp, 1), self.dim)

    def problems(self, tp: int) -> list[str]:
        found = []
        if self.q % tp and not self.balanced(tp):
            found.append(f"{self.q} attention heads do not divide by tp={tp}")
        elif self.kv % tp and tp % self.kv and not self.by_need(tp):
            found.append(
                f"{self.kv} key/value heads cannot be split over tp={tp} ranks (tp must divide them), "
                f"replicated (tp must be a multiple of them) nor held by need ({self.q} query heads "
                "must be a multiple of them)")
        return found

    def at(self, attention) -> Heads:
        """These heads as ``attention`` (the module holding the projections) sees them: some
        models give some layers a larger head (Gemma 4's full-attention layers)."""
        dim = getattr(attention, "head_dim", None)
        if isinstance(dim, int) and not isinstance(dim, bool) and dim > 0 and dim != self.dim:
            return Heads(self.q, self.kv, dim)
        return self

    def count(self, kind: str) -> int:
        """``q``, ``kv``, ``groups`` (q per kv), ``q_features`` or ``kv_features``."""
        return {"q": self.q, "kv": self.kv, "groups": self.q // self.kv,
                "q_features": self.q * self.dim, "kv_features": self.kv * self.dim}[kind]


def set_local_counts(model, counts: dict[str, str], heads: Heads, tp: int, rank: int = 0) -> list[str]:
    """Set attributes that hold head counts (``self_attn.num_heads`` -> ``q``) to their per-rank value.

    A count read through a config the module shares with the model (``self_attn.config.
    num_attention_heads``) is set on a copy of that config given to the module alone. A module that
    computes with all its heads (its projections kept whole, ``fix_overrides``) keeps its counts.
    """
    from ..patterns import matches

    local, changed = heads.local(tp, rank), []
    for spec, kind in counts.items():
        owner_pattern, _, attr = spec.rpartition(".")
        owner_pattern, _, via_config = owner_pattern.rpartition(".") if owner_pattern.endswith(".config") \
            else (owner_pattern, "", "")
        for path, module in model.named_modules():
            if not matches(owner_pattern, path) or not computes_split(module):
                continue
            target = module
            if via_config:
                target = module.config = copy.copy(module.config)
            if isinstance(getattr(target, attr, None), int):
                setattr(target, attr, local.count(kind))
                changed.append(f"{path}.{via_config + '.' if via_config else ''}{attr}")
    return changed


def _value(config, key):
    """``config.key``, or None; some configs raise for keys that differ per layer (Gemma 4's head_dim)."""
    try:
        return getattr(config, key, None)
    except Exception:
        return None


def _first(config, keys) -> int | None:
    for key in keys:
        value = _value(config, key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def heads_of(config, keys: dict[str, str] | None = None) -> Heads | None:
    """Heads of a Hugging Face config, or None when it names no attention heads.

    ``keys`` names the config attributes to read (``{"q": "n_head", "kv": "n_head"}``) for
    models whose config holds an attribute the usual names would misread.
    """
    keys = keys or {}
    config = getattr(config, "get_text_config", lambda: config)()
    q = _first(config, (keys["q"],) if "q" in keys else Q_KEYS)
    if q is None:
        return None
    kv = _first(config, (keys["kv"],) if "kv" in keys else KV_KEYS)
    # Multi-query models (Falcon-7B, GPT-BigCode) say so with a flag instead of a count.
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        kv = 1
    dim = _value(config, keys.get("dim", "head_dim"))
    if not isinstance(dim, int) or dim <= 0:
        hidden = _first(config, ("hidden_size", "n_embd", "d_model", "n_embed"))
        dim = hidden // q if hidden else 0
    return Heads(q, kv or q, dim)
