"""Persimmon: with ``config.qk_layernorm`` (the default), q and k are normalised per head by one
shared ``LayerNorm(head_dim)`` each, inside the head-sharded region: ``head_norm`` (heads on
dimension 2 of ``[batch, seq, heads, head_dim]``). Without it the norms do not exist.
"""


def plan(model):
    if not getattr(model.config, "qk_layernorm", False):
        return {}
    return {
        "layers.*.self_attn.q_layernorm": "head_norm",
        "layers.*.self_attn.k_layernorm": "head_norm",
    }
