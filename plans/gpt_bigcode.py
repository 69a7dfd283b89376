"""GPT-BigCode (StarCoder, SantaCoder): ``c_attn`` is laid out by ``config.multi_query``.

* ``multi_query=True`` (the default): ``[q (embed_dim); k (head_dim); v (head_dim)]``: the
  query heads are split, the single k/v head is replicated on every rank (gradient summed).
* ``multi_query=False``: per-head ``[heads, 3, head_dim]``: whole heads are split.
"""

C_ATTN = "h.*.attn.c_attn"


def plan(model):
    if model.config.multi_query:
        return {C_ATTN: {"style": "colwise", "parts": ["q", "kv", "kv"]}}
    return {C_ATTN: {"style": "colwise", "unit": "head"}}
