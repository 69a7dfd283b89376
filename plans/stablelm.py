"""StableLM: the llama layout, refused when ``config.qk_layernorm`` is set.

With qk_layernorm, q and k are normalised by ``StableLmLayerNormPerHead``: a ModuleList of
one ``nn.LayerNorm(head_dim)`` per head, zipped with the heads of the (local) q and k. After
sharding, a rank holds only its own heads, but the module would still pair them with norms
0, 1, ... of the whole list, so every rank but the first would use other heads' weights.
Sharding that list with the heads needs a style no registry plan has yet, so tp refuses.
"""

from tp.errors import PlanError


def plan(model):
    if getattr(model.config, "qk_layernorm", False):
        raise PlanError(
            "stablelm with qk_layernorm=True cannot be sharded yet: its q/k norms are a ModuleList of "
            "one LayerNorm per head (StableLmLayerNormPerHead), which each rank would pair with the wrong "
            "heads after the heads are split; no style shards such a list. Use a checkpoint with "
            "qk_layernorm=False, or run the model unsharded")
    return {}
