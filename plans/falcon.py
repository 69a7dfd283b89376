"""Falcon: the fused ``query_key_value`` is laid out three ways, chosen by the config.

* ``new_decoder_architecture`` (Falcon-40B/180B): rows grouped per kv head,
  ``[num_kv_heads, q_per_kv + 2, head_dim]`` (the group's query heads, then its k and v), so
  whole groups are split: ``unit = "group"``. With fewer groups than ranks, the ranks of a group
  share its k and v, each with its share of the group's query heads (``Part.splits_groups``).
* old architecture with ``multi_query`` (Falcon-7B, the config default): ``[q (H heads); k (1);
  v (1)]``; the single k/v head is replicated on every rank, its gradient summed.
* old architecture without ``multi_query``: per-head ``[H, 3, head_dim]``: ``unit = "head"``.

The per-rank ``num_heads``/``num_kv_heads`` are set by the family's local_heads (kv is 1 under
multi-query, as tp.heads reads the ``multi_query`` flag).

ALiBi (``alibi=True``, Falcon-RW) builds one bias per head outside the attention and passes
every layer an attention mask with the bias folded in (``[batch, heads, q, kv]``) and, up to
transformers 5.24, the whole ``alibi`` (``[batch, heads, 1, kv]``) too; ``head_input`` narrows
them to the rank's heads: the mask on the decoder layer (it only passes it on to the
attention), the alibi on the attention where its forward takes one, since a module takes one
style.
"""

import inspect

QKV = "h.*.self_attention.query_key_value"


def plan(model):
    config = model.config
    if config.new_decoder_architecture:
        entries = {QKV: {"style": "colwise", "unit": "group"}}
    elif config.multi_query:
        entries = {QKV: {"style": "colwise", "parts": ["q", "kv", "kv"]}}
    else:
        entries = {QKV: {"style": "colwise", "unit": "head"}}
    if getattr(config, "alibi", False):
        entries["h.*"] = {"style": "head_input", "kwarg": "attention_mask", "head_dim": 1}
        if _attention_takes_alibi(model):
            entries["h.*.self_attention"] = {"style": "head_input", "kwarg": "alibi", "head_dim": 1}
    return entries


def _attention_takes_alibi(model) -> bool:
    attention = next(module for name, module in model.named_modules() if name.endswith("self_attention"))
    return "alibi" in inspect.signature(type(attention).forward).parameters
