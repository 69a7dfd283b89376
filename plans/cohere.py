"""Cohere: the llama layout, plus per-head q/k LayerNorms when ``config.use_qk_norm`` is set.

Those norms hold one weight row per head ([heads, head_dim]) and run on the rank's own heads, so
their rows are sharded with the heads (``shard_rows``): the query heads' as the heads split,
balanced where they do not divide (6 heads at TP=4: 2, 2, 1, 1, stored whole); without
use_qk_norm the modules do not exist and the plan adds nothing.
"""


def plan(model):
    if not getattr(model.config, "use_qk_norm", False):
        return {}
    return {
        "layers.*.self_attn.q_norm": "shard_rows",
        "layers.*.self_attn.k_norm": "shard_rows",
    }
