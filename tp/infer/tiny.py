"""Tiny configs for any transformers causal-LM model type.

``tiny_config(model_type)`` gives the config of a model of that type with tiny widths (hidden 64,
8 heads of 8, 4 kv heads, vocab 256, 4 experts of 32, ...) and as few layers as still hold every
kind of layer the full-size model has (a jamba gets an attention, a mamba, an MoE and a dense MLP
layer). Its causal LM builds on CPU in float32 with well under 2M parameters for nearly every type
in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``; ``CANNOT_BUILD`` names the types that still do not build
or train with ``model(input_ids=ids, labels=ids)``, and why.

Sizes are set by config key, for each key the config class knows (itself or through its
``attribute_map``), so one table serves every family. The layer count is found by building the
model on the meta device (``_layer_count``). ``EXTRA`` holds the few per-type settings that
neither reaches.
"""

from __future__ import annotations

import copy
import functools
import re
from typing import Any

import torch
from torch import nn

from .. import models  # noqa: F401  (registers model_type "yuan" with the Auto classes)

HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM, VOCAB, POSITIONS = 64, 128, 8, 4, 8, 256, 128
# expert widths differ from every other sharded width (kv 32, q and hidden 64, FFN 128), so that
# a plan inferred on a tiny twin cannot mistake one for another
EXPERTS, TOP_K, EXPERT_FFN = 4, 2, 48
DEFAULT_LAYERS = 2
MAX_LAYERS = 8  # a model that needs more layers to hold every layer kind needs an EXTRA entry
MAX_PARAMS = 20_000_000  # hard cap; the tiny models are meant to stay under 2M

# ---------------------------------------------------------------------------------------------
# Sizes, by config key. A key is set only where the config class knows it, so GPT-2 gets
# n_inner=128 but no stray `intermediate_size` that nothing reads.

# The sizes every text config gets. Where two keys are aliases of one field, the first wins
# (Whisper maps both num_attention_heads and num_key_value_heads to encoder_attention_heads).
BASE_SIZES: dict[str, Any] = {
    "hidden_size": HIDDEN,
    "intermediate_size": FFN,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "head_dim": HEAD_DIM,
    "vocab_size": VOCAB,
    "max_position_embeddings": POSITIONS,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# The same sizes under the other names families give them.
ALIAS_SIZES: dict[str, Any] = {
    # width of the residual stream, or of an embedding feeding it
    **dict.fromkeys(["d_model", "n_embd", "emb_dim", "embed_dim", "embedding_dim", "embedding_size",
                     "word_embed_proj_dim", "input_embedding_size", "output_embedding_size", "lru_width",
                     "hidden_size_global", "out_hidden_size", "adapter_in_dim", "adapter_out_dim",
                     "adapter_input_size", "output_channels", "nemo_conv_channels", "ext_pw_out_channel",
                     "depthwise_separable_out_channel"], HIDDEN),
    # dense MLP width
    **dict.fromkeys(["n_inner", "ffn_hidden_size", "ffn_dim", "d_ff", "dff", "dim_ff", "d_inner", "feed_forward_size",
                     "encoder_ffn_dim", "decoder_ffn_dim", "dense_intermediate_size", "intermediate_size_mlp",
                     "mlp_dim"], FFN),
    # attention heads and their width
    **dict.fromkeys(["n_head", "n_heads", "attention_heads", "encoder_attention_heads", "decoder_attention_heads",
                     "num_encoder_attention_heads", "num_decoder_attention_heads", "swa_num_attention_heads"], HEADS),
    **dict.fromkeys(["num_kv_heads", "swa_num_key_value_heads", "multi_query_group_num"], KV_HEADS),
    **dict.fromkeys(["d_head", "dim_head", "d_kv", "attention_head_size", "swa_head_dim"], HEAD_DIM),
    # sequence length and vocabularies (BLT's hashed byte n-gram tables included)
    **dict.fromkeys(["n_positions", "n_ctx", "max_seq_len", "max_target_positions", "context_length"], POSITIONS),
    **dict.fromkeys(["decoder_vocab_size", "unpadded_vocab_size", "vocab_size_per_layer_input",
                     "encoder_hash_byte_group_vocab", "pronunciation_vocab_size", "shape_vocab_size"], VOCAB),
    # the encoder of encoder-decoder families (their causal LM is the decoder alone)
    **dict.fromkeys(["encoder_layers", "num_encoder_layers"], DEFAULT_LAYERS),
}

# Mixture of experts: set where the config has an expert count (None: a dense variant).
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
MOE_SIZES: dict[str, Any] = {
    **dict.fromkeys(EXPERT_COUNT_KEYS, EXPERTS),
    **dict.fromkeys(["num_experts_per_tok", "moe_topk", "moe_k", "num_experts_per_token", "top_k_experts"], TOP_K),
    **dict.fromkeys(["moe_intermediate_size", "expert_ffn_hidden_size", "shared_expert_intermediate_size",
                     "moe_shared_expert_intermediate_size", "shared_experts_intermediate_size",
                     "shared_intermediate_size"], EXPERT_FFN),
    "zero_expert_num": 2,  # LongCat's identity ("zero") experts, routed like the others
}
# Grouped routing (DeepSeek-V3: top groups, then top experts in them): 2 groups of 2 experts,
# 1 group picked, where the full model has groups at all.
EXPERT_GROUP_SIZES = {"n_group": 2, "num_expert_group": 2, "topk_group": 1}

# Low-rank projections (None: full rank), and the indexer of DeepSeek sparse attention, which picks
# index_topk (8 of the 16 test tokens) keys per query.
LOW_RANK_SIZES: dict[str, Any] = {
    "q_lora_rank": 32,
    "o_lora_rank": 32,
    "index_n_heads": KV_HEADS,
    "index_head_dim": 2 * HEAD_DIM,
    "index_topk": 8,
}

# Multi-head latent attention (DeepSeek-V2/V3 and kin): as many k/v heads as q heads.
MLA_SIZES: dict[str, Any] = {
    "num_key_value_heads": HEADS,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": HEAD_DIM,
    "qk_nope_head_dim": HEAD_DIM,
    "v_head_dim": HEAD_DIM,
    "qk_head_dim": 2 * HEAD_DIM,  # nope + rope, where the config stores the sum
}

# Linear attention (gated delta net, KDA) and state-space (mamba) mixers; a mamba mixer is
# expand (2) * hidden = 128 wide: 16 heads of 8.
MIXER_SIZES: dict[str, Any] = {
    **dict.fromkeys(["linear_key_head_dim", "linear_value_head_dim", "linear_head_dim"], HEAD_DIM),
    "linear_num_key_heads": KV_HEADS,
    **dict.fromkeys(["linear_num_value_heads", "linear_num_heads"], HEADS),
    **dict.fromkeys(["mamba_d_head", "mamba_head_dim", "mamba_headdim"], HEAD_DIM),
    **dict.fromkeys(["mamba_n_heads", "mamba_num_heads", "n_mamba_heads"], 2 * HIDDEN // HEAD_DIM),
    "mamba_d_ssm": 2 * HIDDEN,
    **dict.fromkeys(["mamba_d_state", "ssm_state_size", "state_size"], 16),
    **dict.fromkeys(["mamba_dt_rank", "time_step_rank"], 8),
}

# Keys holding a (sub-)config's layer count; for encoder-decoder families, the decoder's.
LAYER_COUNT_KEYS = ("decoder_layers", "num_decoder_layers", "num_hidden_layers", "num_layers", "n_layers", "n_layer",
                    "depth", "num_blocks")

TEXT_CONFIG_NAMES = ("decoder", "generator", "text_config")

# Per-type settings the tables and the layer search do not reach, applied after them (and before
# the caller's overrides). A key goes to the text config, or to the sub-config it names. An entry
# that sets per-layer lists sets the layer count too (the layer search is then skipped).
_SLIDING, _FULL = "sliding_attention", "full_attention"
# Qwen4-Exp: its indexed-attention sizes default to None, which does not build; pick 8 of the 16
# tokens in blocks of 4. Its hyper-connections are low rank (320 by default).
_QWEN4_EXP = {"indexer_n_heads": KV_HEADS, "indexer_kv_heads": 1, "indexer_head_dim": HEAD_DIM,
              "indexer_budget": 8, "indexer_compress_ratio": 4, "hc_lowrank": 2 * HEAD_DIM}
# Dots3-Note: its sliding layers' head_dim must be their qk_nope_head_dim (192 in per_layer_config,
# scaled to 12) + qk_rope_head_dim (8).
_DOTS3_NOTE = {"head_dim": 20}
# Gemma 3n: the last 15 of its 35 layers reuse the kv cache of the last unshared layer of their
# attention type, and only the first 10 have sparse activations: 6 layers hold each combination.
_GEMMA3N = {"num_hidden_layers": 6, "layer_types": [_SLIDING, _FULL] * 3, "num_kv_shared_layers": 2,
            "activation_sparsity_pattern": [0.95, 0.95, 0.0, 0.0, 0.0, 0.0]}
EXTRA: dict[str, dict[str, Any]] = {
    # The defaults have no attention layer (Bamba-9B: 3 of 32), but the forward needs one (the
    # hybrid cache measures the sequence on attention layers).
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"num_hidden_layers": 2, "layer_types": ["linear_attention", _FULL]},
    # The default leaves layer_types unset, which does not build; LFM2-MoE mixes conv and attention.
    "lfm2_moe": {"num_hidden_layers": 4, "layer_types": ["conv", _FULL, "conv", _FULL]},
    # The default leaves the experts unset (None), which does not build; dots.llm1 has one dense layer.
    "dots1": {"n_routed_experts": EXPERTS, "n_shared_experts": 1, "num_experts_per_tok": TOP_K,
              "moe_intermediate_size": EXPERT_FFN, "first_k_dense_replace": 1},
    # rope_parameters default to {}, but the model reads them by layer type.
    "cohere_compass_text": {"rope_parameters": {_FULL: {"rope_type": "default", "rope_theta": 10000.0}}},
    # DbrxAttention reads attn_config.rope_theta, which the default lacks; experts live in ffn_config.
    # Its attention clamps q/k/v to +-clip_qkv, which the default leaves None (a clamp error).
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "kv_n_heads": KV_HEADS, "clip_qkv": 8.0},
             "ffn_config": {"ffn_hidden_size": EXPERT_FFN, "moe_num_experts": EXPERTS, "moe_top_k": TOP_K}},
    "qwen4_exp": _QWEN4_EXP,
    "qwen4_exp_text": _QWEN4_EXP,
    # Its forward builds a kv cache from the top config, which has no layer count (its sub-configs do).
    "blt": {"use_cache": False},
    "dots3_note": _DOTS3_NOTE,
    "dots3_note_text": _DOTS3_NOTE,
    # Its cache sizes the recurrent q/k state with the v head width (qk_dim_factor 0.5 halves it).
    "xlstm": {"use_cache": False},
    # num_heads is Mamba-2's SSM head count: expand * hidden / head_dim.
    "mamba2": {"num_heads": 2 * HIDDEN // HEAD_DIM},
    # "ZAYA currently supports num_experts_per_tok=1 only".
    "zaya": {"num_experts_per_tok": 1},
    # Without a language the adapters refuse the input.
    "xmod": {"default_language": "en_XX"},
    # Its LM head needs is_decoder; training needs the axial position shape to multiply out to the
    # sequence length (16), and chunks that divide it; a fixed hash seed, or LSH is random per call.
    "reformer": {"is_decoder": True, "hash_seed": 0, "axial_pos_shape": [4, 4],
                 "axial_pos_embds_dim": [HIDDEN // 2, HIDDEN // 2], "local_attn_chunk_length": 4,
                 "lsh_attn_chunk_length": 4},
    "gemma3n": _GEMMA3N,
    "gemma3n_text": _GEMMA3N,
    # A draft model whose every layer reuses the target model's kv cache (num_kv_shared_layers is
    # its layer count): 2 layers, both shared, one of each attention type.
    "gemma4_unified_assistant": {"num_hidden_layers": 2, "layer_types": [_SLIDING, _FULL], "num_kv_shared_layers": 2},
}

# Types whose tiny causal LM does not build, or does not run forward + backward on CPU, and why.
CANNOT_BUILD: dict[str, str] = {
    "gemma3n": "its vision tower is a timm model (TimmWrapperModel), which needs timm and Pillow",
    "gemma4_assistant": "a speculative-decoding draft model: its forward needs the target model's inputs_embeds "
                        "and shared kv states, not input_ids, and returns no loss",
    "gemma4_unified_assistant": "a speculative-decoding draft model: its forward needs the target model's "
                                "inputs_embeds and shared kv states, not input_ids, and returns no loss",
    **dict.fromkeys(["musicgen", "musicgen_melody"], (
        "AutoModelForCausalLM gives the composite config to MusicgenForCausalLM, which needs the decoder config "
        "(no auto mapping of its own) and labels per codebook ([batch, seq, num_codebooks])")),
    "git": "needs pixel inputs: its loss drops the image-token positions from the logits, so labels without "
           "pixel_values do not line up",
}


# ---------------------------------------------------------------------------------------------


def tiny_config(model_type: str, **overrides):
    """The config of a tiny ``model_type`` causal LM: tiny sizes, every layer kind of the full-size
    model, then ``overrides`` (text-config keys; a new layer count cuts the per-layer lists).
    Raises ValueError when the model would still have over 20M parameters (counted on the meta
    device, so nothing is allocated)."""
    settings = copy.deepcopy(_tiny_settings(model_type))
    text = _text_of(model_type, settings)
    text_default = _default(model_type, text=True)
    count_key, _ = _layer_count_key(text_default)
    overrides = {_real_key(text_default, k): v for k, v in overrides.items()}
    if count_key in overrides:  # re-cut the per-layer entries (or leave them to the config, if deeper)
        for key in _layer_columns(text_default):
            if isinstance(text.get(key), (list, dict)):
                del text[key]
        text.update(_layer_settings(text_default, text, overrides[count_key]))
    text.update(overrides)
    config = _make_config(model_type, settings)
    count = parameter_count(config)
    if count > MAX_PARAMS:
        raise ValueError(f"the tiny {model_type} still has {count:,} parameters (> {MAX_PARAMS:,})")
    return config


def causal_lm_type(model_type: str) -> str:
    """The causal-LM type whose tiny config builds a model of ``model_type``: itself, or for a text
    config no Auto class builds alone (Emu3's ``emu3_text_model``), the type whose text config it is."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return model_type
    for candidate in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        if model_type.startswith(candidate) and _text_config_key(_default_config(candidate)) \
                and _default(candidate, text=True).model_type == model_type:
            return candidate
    return model_type


def switched_off(config) -> dict[str, Any]:
    """The sizes ``config`` (a real model's, or its text config) sets to 0 where a tiny config sets
    them: a part the model does not have (GraniteMoeShared's shared MLP at
    ``shared_intermediate_size=0``, a dense variant's ``num_experts=0``), which a tiny model of the
    same type must not have either."""
    known = _known_values(config)
    tables = {**BASE_SIZES, **ALIAS_SIZES, **MOE_SIZES, **MIXER_SIZES, **LOW_RANK_SIZES, **MLA_SIZES}
    return {_real_key(config, key): 0 for key, tiny in tables.items()
            if known.get(key) == 0 and tiny != 0 and not key.endswith("token_id")}


def parameter_count(config) -> int:
    """Parameters of the causal LM of ``config``, built on the meta device."""
    return sum(p.numel() for p in _meta_model(config).parameters())


def layer_kinds(config) -> list[tuple]:
    """Per layer of the causal LM's main layer stack, its kind: its entries in the per-layer config
    lists (layer_types, mlp_layer_types, per_layer_config, ...) and its modules' classes and
    parameter shapes. Built on the meta device."""
    text = config.get_text_config(decoder=True) if _text_config_key(config) else config
    count_key, count = _layer_count_key(text)
    if count_key is None:
        return []
    stack = _main_stack(_meta_model(config), count)
    modules = [_module_kind(layer) for layer in stack] if stack is not None else [()] * count
    values = text.to_dict()
    columns = [_per_layer_values(kind, values.get(key), count)
               for key, kind in _layer_columns(_default(config.model_type, text=True)).items()]
    return [(tuple(column[i] for column in columns), modules[i]) for i in range(count)]


# ---------------------------------------------------------------------------------------------
# Defaults and keys


@functools.cache
def _default_config(model_type: str):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type)


def _default(model_type: str, *, text: bool):
    """The library default config of ``model_type``, or its text (decoder) sub-config."""
    config = _default_config(model_type)
    key = _text_config_key(config)
    return getattr(config, key) if text and key else config


def _text_config_key(config) -> str | None:
    """The attribute holding the text (decoder) sub-config; None when the config is its own."""
    for name in TEXT_CONFIG_NAMES:
        if name in getattr(config, "sub_configs", {}) and getattr(config, name, None) is not None:
            return name
    return None


def _sub_config_names(config) -> list[str]:
    return [name for name in getattr(config, "sub_configs", {}) if getattr(config, name, None) is not None]


def _real_key(config, key: str) -> str:
    return getattr(config, "attribute_map", {}).get(key, key)


def _known_values(config) -> dict[str, Any]:
    """The config's fields and their values, attribute_map aliases included."""
    values = config.to_dict()
    for alias, real in getattr(config, "attribute_map", {}).items():
        if real in values:
            values.setdefault(alias, values[real])
    return values


def _sizes_for(config, sizes: dict[str, Any], *, skip_none: bool = False) -> dict[str, Any]:
    """``sizes`` for the keys ``config`` knows, by real field name (the first key naming a field
    wins). ``skip_none``: leave fields whose value is None (the feature is off)."""
    known = _known_values(config)
    out: dict[str, Any] = {}
    for key, value in sizes.items():
        if key in known and not (skip_none and known[key] is None):
            out.setdefault(_real_key(config, key), value)
    return out


def _layer_count_key(config) -> tuple[str | None, int]:
    """(the real key of the config's layer count, its value); (None, 0) if it has none."""
    known = _known_values(config)
    for key in LAYER_COUNT_KEYS:
        if type(known.get(key)) is int:
            return _real_key(config, key), known[key]
    return None, 0


# ---------------------------------------------------------------------------------------------
# Settings: the keyword arguments of AutoConfig.for_model, with sub-configs as dicts.


def _shrunk(config, *, text: bool) -> dict[str, Any]:
    """Tiny sizes for one (sub-)config: the values its composite's default gave it (where they
    differ from its class defaults), then the size tables. Its own sub-configs are shrunk too;
    a non-text sub-config (vision or audio tower, ...) gets 2 layers."""
    class_default = type(config)().to_dict()
    settings: dict[str, Any] = {"model_type": config.model_type}
    settings.update({k: v for k, v in config.to_dict().items()
                     if class_default.get(k, v) != v and k not in ("transformers_version", "architectures")})
    known = _known_values(config)
    settings.update(_sizes_for(config, {**BASE_SIZES, **ALIAS_SIZES}))
    if any(known.get(key) is not None for key in EXPERT_COUNT_KEYS):
        settings.update(_sizes_for(config, MOE_SIZES))
        settings.update({k: v for k, v in _sizes_for(config, EXPERT_GROUP_SIZES).items() if (known[k] or 0) > 1})
    settings.update(_sizes_for(config, MIXER_SIZES, skip_none=True))
    settings.update(_sizes_for(config, LOW_RANK_SIZES, skip_none=True))
    if known.get("kv_lora_rank") is not None:
        settings.update(_sizes_for(config, MLA_SIZES, skip_none=True))
    if "rotary_dim" in known:
        settings["rotary_dim"] = HEAD_DIM
    for name in _sub_config_names(config):
        settings[name] = _shrunk(getattr(config, name), text=False)
    if not text and _layer_count_key(config)[0]:
        settings.update(_layer_settings(config, settings, DEFAULT_LAYERS))
    return settings


@functools.cache
def _base_settings(model_type: str) -> dict[str, Any]:
    """Tiny widths for every (sub-)config, then EXTRA; the text config keeps its default depth."""
    default = _default_config(model_type)
    text_key = _text_config_key(default)
    if text_key is None:
        settings = _shrunk(default, text=True)
        del settings["model_type"]
    else:
        settings = {name: _shrunk(getattr(default, name), text=name == text_key) for name in _sub_config_names(default)}
    text = settings[text_key] if text_key else settings
    for key, value in copy.deepcopy(EXTRA.get(model_type, {})).items():
        if isinstance(value, dict) and isinstance(text.get(key), dict):
            text[key].update(value)  # a sub-config of the text config
        elif isinstance(value, dict) and text_key and isinstance(settings.get(key), dict):
            settings[key].update(value)  # a sub-config beside it (vision_config, ...)
        else:
            text[key] = value
    return settings


@functools.cache
def _tiny_settings(model_type: str) -> dict[str, Any]:
    settings = copy.deepcopy(_base_settings(model_type))
    text_default = _default(model_type, text=True)
    count_key, _ = _layer_count_key(text_default)
    if count_key and count_key not in EXTRA.get(model_type, {}):
        text = _text_of(model_type, settings)
        text.update(_layer_settings(text_default, text, _layer_count(model_type)))
    return settings


def _text_of(model_type: str, settings: dict[str, Any]) -> dict[str, Any]:
    key = _text_config_key(_default_config(model_type))
    return settings[key] if key else settings


def _make_config(model_type: str, settings: dict[str, Any]):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **copy.deepcopy(settings))


# ---------------------------------------------------------------------------------------------
# Layers: per-layer config entries, and the fewest layers that hold every layer kind.


def _layer_columns(config) -> dict[str, str]:
    """The config's entries that say something per layer: key -> "list" (layer_types, ...),
    "index" (a list of layer indices: moe_layers=[1, 3], ...) or "overrides" (per_layer_config,
    {layer: {key: value}})."""
    count_key, count = _layer_count_key(config)
    columns = {}
    for key, value in config.to_dict().items():
        if key == count_key:
            continue
        if key == "per_layer_config" and isinstance(value, dict):
            columns[key] = "overrides"
        elif _is_layer_index_list(key, value, count):
            columns[key] = "index"
        elif isinstance(value, list) and len(value) == count:
            columns[key] = "list"
    return columns


def _is_layer_index_list(key: str, value: Any, count: int) -> bool:
    return (
        any(word in key for word in ("layer", "idx", "ids"))
        and isinstance(value, list)
        and bool(value)
        and all(type(i) is int and 0 <= i < count for i in value)
        and value == sorted(set(value))
    )


def _per_layer_values(kind: str, value: Any, count: int) -> list:
    if kind == "index":
        return [isinstance(value, list) and i in value for i in range(count)]
    if kind == "overrides":
        by_layer = {int(k): v for k, v in (value or {}).items()}
        return [repr(by_layer.get(i)) for i in range(count)]
    return [repr(value[i]) if isinstance(value, list) and i < len(value) else None for i in range(count)]


def _layer_settings(config, sized: dict[str, Any], count: int) -> dict[str, Any]:
    """``count`` layers for ``config``: its per-layer entries cut to the first ``count`` layers
    (left to the config to derive when it is deeper than the default), per-layer overrides scaled
    like the sizes (a layer with twice the default head_dim keeps twice the tiny one)."""
    count_key, full_count = _layer_count_key(config)
    values = config.to_dict()
    settings: dict[str, Any] = {count_key: count}
    for key, kind in _layer_columns(config).items():
        if kind == "overrides":
            settings[key] = {k: _scaled(v, sized, values) for k, v in values[key].items() if int(k) < count}
        elif count > full_count or (key in sized and not isinstance(sized[key], list)):
            continue  # derived by the config, or sized above (a per-layer intermediate_size)
        elif kind == "index":
            settings[key] = [i for i in values[key] if i < count]
        else:
            settings[key] = values[key][:count]
    return settings


def _scaled(overrides: dict[str, Any], sized: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in overrides.items():
        default = defaults.get(key)
        if type(value) is int and type(default) is int and default and type(sized.get(key)) is int:
            value = max(1, round(sized[key] * value / default))
        out[key] = value
    return out


def _settings_with_layers(model_type: str, count: int) -> dict[str, Any]:
    settings = copy.deepcopy(_base_settings(model_type))
    text = _text_of(model_type, settings)
    text.update(_layer_settings(_default(model_type, text=True), text, count))
    return settings


@functools.cache
def _layer_count(model_type: str) -> int:
    """The fewest layers (2 to MAX_LAYERS) whose model has every layer kind (``layer_kinds``) of
    the model at its default depth with the tiny widths; the count with the most kinds when none
    has them all, 2 when the default depth does not build."""
    _, full_count = _layer_count_key(_default(model_type, text=True))
    every_kind = _kinds_at(model_type, full_count)
    if not every_kind:
        return DEFAULT_LAYERS
    found = {}
    for count in range(DEFAULT_LAYERS, max(DEFAULT_LAYERS, min(MAX_LAYERS, full_count)) + 1):
        found[count] = len(every_kind & _kinds_at(model_type, count))
        if found[count] == len(every_kind):
            return count
    return max(found, key=lambda count: (found[count], -count))


def _kinds_at(model_type: str, count: int) -> set[tuple]:
    """The layer kinds of the tiny model with ``count`` layers; none if it does not build (a
    config refuses some depths: Zamba ties its shared block only across two hybrid layers)."""
    try:
        return set(layer_kinds(_make_config(model_type, _settings_with_layers(model_type, count))))
    except Exception:  # noqa: BLE001 -- configs and models raise all kinds of errors for what they refuse
        return set()


# ---------------------------------------------------------------------------------------------
# Models on the meta device


def _meta_model(config) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


TOWER_WORDS = ("vision", "visual", "image", "audio", "vq")


def _main_stack(model: torch.nn.Module, count: int) -> torch.nn.ModuleList | None:
    """The ModuleList of ``count`` layers outside the vision and audio towers (which may have lists
    of the same length), the outermost one (LongCat's layers hold lists of two sublayers)."""
    stacks = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count}
    return stacks[min(stacks, key=_stack_rank)] if stacks else None


def _stack_rank(name: str) -> tuple[bool, int]:
    return any(word in name for word in TOWER_WORDS), name.count(".")


def _module_kind(layer: torch.nn.Module) -> tuple:
    """A layer's module classes and parameter shapes, by name with list indices as ``*``: a module
    shared by several layers (Zamba2's) holds one entry per layer, which must not count."""
    entries = {(_indexless(name), type(m).__name__) for name, m in layer.named_modules()}
    entries |= {(_indexless(name), tuple(p.shape)) for name, p in layer.named_parameters()}
    return tuple(sorted(entries, key=repr))


def _indexless(name: str) -> str:
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name)


def auto_class(config, encoder_decoder: bool | None = None):
    """The transformers Auto class to build ``config`` with: AutoModelForCausalLM, or for an
    encoder-decoder config AutoModelForSeq2SeqLM (T5, BART) or AutoModelForSpeechSeq2Seq
    (Whisper). ``encoder_decoder=None`` picks the encoder-decoder model only for a type with no
    causal-LM class (T5): BART and Whisper configs also build a decoder-only ``...ForCausalLM``,
    which the census and plan inference keep using unless ``encoder_decoder=True``."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSpeechSeq2Seq,
    )

    seq2seq = [a for a in (AutoModelForSeq2SeqLM, AutoModelForSpeechSeq2Seq) if type(config) in a._model_mapping]
    if encoder_decoder is None:
        encoder_decoder = bool(getattr(config, "is_encoder_decoder", False)) and \
            type(config) not in AutoModelForCausalLM._model_mapping
    return seq2seq[0] if encoder_decoder and seq2seq else AutoModelForCausalLM


def build(config, *, device: str | torch.device = "cpu", seed: int = 0,
          encoder_decoder: bool | None = None, model_class: type | None = None) -> nn.Module:
    """A randomly initialised float32 model (``auto_class``: a causal LM, or an encoder-decoder
    one; or ``model_class``, a transformers model class); on the meta device no memory is used."""
    torch.manual_seed(seed)
    with torch.device(device):
        if model_class is not None:
            model = model_class._from_config(config, dtype=torch.float32)
        else:
            model = auto_class(config, encoder_decoder).from_config(config, dtype=torch.float32)
    return model.eval()
