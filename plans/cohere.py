"""Cohere: the llama layout, plus per-head q/k LayerNorms when ``config.use_qk_norm`` is set.

Those norms hold one weight row per head ([heads, head_dim]), so they are sharded with the
heads; without use_qk_norm the modules do not exist and the plan adds nothing.
"""


def plan(model):
    if not getattr(model.config, "use_qk_norm", False):
        return {}
    return {
        "layers.*.self_attn.q_norm": "head_norm",
        "layers.*.self_attn.k_norm": "head_norm",
    }
