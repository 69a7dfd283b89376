"""tp.tiny: tiny configs for transformers causal-LM types (CPU only, no process group)."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from tp.infer.tiny import CANNOT_BUILD, EXTRA, layer_kinds, parameter_count, tiny_config


def _train_step(config) -> float:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert any(p.grad is not None for p in model.parameters())
    return loss.item()


@pytest.mark.parametrize("model_type", ["llama", "jamba", "deepseek_v3", "gpt2", "gemma3"])
def test_builds_small_and_trains(model_type):
    config = tiny_config(model_type)
    assert parameter_count(config) < 2_000_000
    assert torch.isfinite(torch.tensor(_train_step(config)))


@pytest.mark.parametrize("model_type", ["jamba", "deepseek_v3", "gemma3", "qwen3_next"])
def test_every_layer_kind_of_the_full_depth_is_present(model_type):
    """The same widths at the default depth (the override re-cuts the per-layer lists) have no
    layer kind the tiny model lacks."""
    tiny = tiny_config(model_type)
    text = tiny.get_text_config()
    full_depth = tiny_config(model_type, num_hidden_layers=_default_depth(model_type))
    assert 2 <= text.num_hidden_layers <= 8
    assert set(layer_kinds(full_depth)) <= set(layer_kinds(tiny))


def _default_depth(model_type):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type).get_text_config().num_hidden_layers


def test_jamba_has_attention_mamba_moe_and_dense_layers():
    config = tiny_config("jamba")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    classes = {type(m).__name__ for m in model.modules()}
    assert {"JambaAttentionDecoderLayer", "JambaMambaDecoderLayer", "JambaSparseMoeBlock", "JambaMLP"} <= classes
    assert config.num_hidden_layers <= 8


def test_text_sizes():
    llama = tiny_config("llama")
    assert (llama.hidden_size, llama.intermediate_size, llama.num_attention_heads) == (64, 128, 8)
    assert (llama.num_key_value_heads, llama.head_dim, llama.vocab_size) == (4, 8, 256)
    assert (llama.pad_token_id, llama.bos_token_id, llama.eos_token_id) == (0, 1, 2)
    assert llama.num_hidden_layers == 2
    gpt2 = tiny_config("gpt2")
    assert (gpt2.n_embd, gpt2.n_head, gpt2.n_inner, gpt2.n_positions) == (64, 8, 128, 128)
    assert "head_dim" not in gpt2.to_dict()  # GPT-2 has no such key: none is stored
    assert tiny_config("gptj").rotary_dim == 8


def test_moe_and_latent_attention_sizes():
    config = tiny_config("deepseek_v3")
    assert (config.n_routed_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (4, 2, 48)
    assert config.num_key_value_heads == config.num_attention_heads == 8
    assert (config.q_lora_rank, config.kv_lora_rank) == (32, 16)
    assert (config.qk_rope_head_dim, config.qk_nope_head_dim, config.v_head_dim) == (8, 8, 8)
    assert config.first_k_dense_replace < config.num_hidden_layers  # a dense and an MoE layer


def test_composite_config_shrinks_text_and_vision():
    config = tiny_config("gemma3")
    text = config.text_config
    assert (text.hidden_size, text.num_attention_heads, text.vocab_size) == (64, 8, 256)
    assert {"sliding_attention", "full_attention"} <= set(text.layer_types)
    assert len(text.layer_types) == text.num_hidden_layers
    assert (config.vision_config.hidden_size, config.vision_config.num_hidden_layers) == (64, 2)


def test_overrides_apply_last_to_the_text_config():
    assert tiny_config("llama", num_hidden_layers=3, hidden_size=32).to_dict()["hidden_size"] == 32
    text = tiny_config("gemma3", num_hidden_layers=3).text_config
    assert text.num_hidden_layers == len(text.layer_types) == 3
    assert tiny_config("gpt2", n_layer=3).n_layer == 3


def test_deterministic():
    assert tiny_config("jamba").to_dict() == tiny_config("jamba").to_dict()


def test_refuses_big_models():
    with pytest.raises(ValueError, match="parameters"):
        tiny_config("llama", vocab_size=1_000_000)


def test_tables_name_causal_lm_types():
    assert set(CANNOT_BUILD) <= set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    assert set(EXTRA) <= set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    assert all(reason and "\n" not in reason for reason in CANNOT_BUILD.values())
