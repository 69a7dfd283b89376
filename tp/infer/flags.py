"""The config options that change a model's forward, read from its config class, for sweeps that
shard tiny models with the flags published checkpoints turn on (QKV clipping, biases, q/k norms,
sliding windows, soft-capping, multipliers, tied embeddings, ...).

The options come from the config class's own ``__init__`` arguments (those of
``PretrainedConfig`` itself are left out), each set to a value that switches its code path on:

- a boolean is flipped;
- an argument that defaults to None and holds a float (``clip_qkv``) gets 0.5, one that holds an
  int (``sliding_window``) gets 4;
- a float that defaults to 1.0 and scales something (``*multiplier*``, ``*factor*``, ``*scale*``)
  gets 0.5.

Sizes, token ids and switches that do not change the computation are left alone.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from typing import Any

# arguments that are sizes, ids or bookkeeping: changing them changes shapes, not code paths
NOT_A_FLAG = re.compile(
    r"size|head|dim|layers|vocab|token_id|positions|experts|rank|groups|num_|_id$|^use_cache$|initializer|inner|"
    r"^summary_|"
    r"dropout|eps$|^output_|^return_|dtype|chunk|tp$|pretraining_tp|^bos|^eos|^pad|^sep|^decoder_start|"
    r"^is_decoder|is_encoder_decoder|^add_cross_attention|^tie_encoder_decoder|^cross_attention|"
    r"router_aux|aux_loss|z_loss|jitter|^output_router|^norm_topk_prob$|_init_|init_std|^rope_theta$")
SCALES = re.compile(r"multiplier|factor|scale")


def _types(annotation: Any) -> set[type]:
    if isinstance(annotation, (types.UnionType,)) or typing.get_origin(annotation) is typing.Union:
        return {t for a in typing.get_args(annotation) for t in _types(a)}
    return {annotation} if isinstance(annotation, type) else set()


def forward_flags(config_class: type) -> list[tuple[str, Any]]:
    """(argument, value) for each option of ``config_class`` that switches a code path on."""
    from transformers import PretrainedConfig

    base = set(inspect.signature(PretrainedConfig.__init__).parameters)
    found = []
    for name, parameter in inspect.signature(config_class.__init__).parameters.items():
        if name in base or name in ("self", "kwargs") or NOT_A_FLAG.search(name):
            continue
        kinds, default = _types(parameter.annotation) - {type(None)}, parameter.default
        if kinds == {bool} and isinstance(default, bool):
            found.append((name, not default))
        elif kinds == {bool} and default is None:
            found.append((name, True))
        elif default is None and float in kinds:
            found.append((name, 0.5))
        elif default is None and kinds == {int}:
            found.append((name, 4))
        elif default == 1.0 and float in kinds and SCALES.search(name):
            found.append((name, 0.5))
    return found


def flags_of(config) -> dict[str, Any]:
    """The forward-changing options ``config`` sets away from its class's defaults (the flags a
    tiny twin of the model must keep)."""
    defaults = {name: p.default for name, p in inspect.signature(type(config).__init__).parameters.items()}
    found = {}
    for name, _ in forward_flags(type(config)):
        value = getattr(config, name, defaults.get(name))
        # a per-layer list (Gemma 3n's activation sparsity) belongs to the real layer count
        if value != defaults.get(name) and isinstance(value, (bool, int, float)):
            found[name] = value
    return found
