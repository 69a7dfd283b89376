"""StableLM: the llama layout, plus per-head q/k LayerNorms when ``config.qk_layernorm`` is set.

With qk_layernorm (StableLM 2 12B), q and k are normalised by ``StableLmLayerNormPerHead``: a
ModuleList of one LayerNorm per head, zipped with the heads of the (local) q and k. Each rank runs
the norms of its own heads (``per_head_norms``): its query heads, and the kv heads it holds.
"""


def plan(model):
    if not getattr(model.config, "qk_layernorm", False):
        return {}
    return {
        "layers.*.self_attn.q_layernorm": {"style": "per_head_norms", "heads": "q"},
        "layers.*.self_attn.k_layernorm": {"style": "per_head_norms", "heads": "kv"},
    }
