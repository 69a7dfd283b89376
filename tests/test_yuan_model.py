"""tp.models.yuan against formulas written out independently from the Yuan 2.0 notes
(/work/shared/notes/yuan.md): the shared-qk head layout, the localized filtering closed
form, the MLP with the activation on up_proj, the HF parameter names and shapes, and the
transformers integration (Auto classes, loss, save/load, cache, generate)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from tp.models.yuan import (
    LocalizedFiltering,
    YuanAttention,
    YuanConfig,
    YuanForCausalLM,
    YuanMLP,
    document_mask,
    eod_counts,
    eod_reset_position_ids,
)

E, H, D, I, V, L = 32, 4, 8, 48, 64, 2  # hidden, heads, head_dim, intermediate, vocab, layers


TINY = {
    "hidden_size": E, "num_attention_heads": H, "intermediate_size": I, "num_hidden_layers": L,
    "vocab_size": V, "max_position_embeddings": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}


def tiny_config(**overrides) -> YuanConfig:
    return YuanConfig(**{**TINY, **overrides})


def randomize(module: nn.Module, seed: int = 0, std: float = 0.3) -> nn.Module:
    """Every parameter (norm weights and conv biases included) drawn at random: the default
    init (ones, zeros, std 0.02) would hide mistakes in the terms it makes trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return module


def tiny_model(seed: int = 0, **overrides) -> YuanForCausalLM:
    torch.manual_seed(seed)
    return randomize(YuanForCausalLM(tiny_config(**overrides)), seed).eval()


# ---------------------------------------------------------------- reference formulas (notes)

def reference_rms(x, weight, eps=1e-6):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def reference_lf(lf: LocalizedFiltering, x: torch.Tensor) -> torch.Tensor:
    """Notes §3: y1[t] = W1[...,0,0] x[t-1] + W1[...,1,0] x[t] + b1, y2 likewise on y1, with
    x[-1] = y1[-1] = 0; lf[t] = RMSNorm(y2[t] + x[t]) with eps 1e-6."""
    w1, b1, w2, b2 = lf.conv1.weight, lf.conv1.bias, lf.conv2.weight, lf.conv2.bias
    seq = x.shape[1]
    y1 = []
    for t in range(seq):
        prev = x[:, t - 1] if t > 0 else torch.zeros_like(x[:, 0])
        y1.append(prev @ w1[:, :, 0, 0].T + x[:, t] @ w1[:, :, 1, 0].T + b1)
    y2 = []
    for t in range(seq):
        prev = y1[t - 1] if t > 0 else torch.zeros_like(y1[0])
        y2.append(prev @ w2[:, :, 0, 0].T + y1[t] @ w2[:, :, 1, 0].T + b2)
    return reference_rms(torch.stack(y2, 1) + x, lf.output_layernorm.weight)


def reference_rope(t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE, base 10000: feature i pairs with i + d/2."""
    half = t.shape[-1] // 2
    inv_freq = 10000.0 ** (-2.0 * torch.arange(half, dtype=torch.float64) / t.shape[-1])
    angle = positions[..., None].double() * inv_freq
    cos, sin = angle.cos().to(t.dtype), angle.sin().to(t.dtype)
    a, b = t[..., :half], t[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)


def true_qk_weights(wq: torch.Tensor, wk: torch.Tensor, heads: int):
    """Notes §2: Wq_true = cat(Wq.view(H,d,E)[0::2], Wk.view(H,d,E)[0::2]), Wk_true with [1::2]."""
    hidden = wq.shape[1]
    d = wq.shape[0] // heads
    wq_true = torch.cat([wq.view(heads, d, hidden)[0::2], wk.view(heads, d, hidden)[0::2]]).reshape(-1, hidden)
    wk_true = torch.cat([wq.view(heads, d, hidden)[1::2], wk.view(heads, d, hidden)[1::2]]).reshape(-1, hidden)
    return wq_true, wk_true


def reference_attention(attn: YuanAttention, x, positions, wq=None, wk=None):
    """Standard causal per-head attention with separate query/key weights (default: the true
    ones from the shared-qk formula); q/k read the LF output, v the input."""
    if wq is None:
        wq, wk = true_qk_weights(attn.q_proj.weight, attn.k_proj.weight, H)
    x_lf = reference_lf(attn.lf_gate, x)
    seq = x.shape[1]
    future = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)
    heads = []
    for j in range(H):
        rows = slice(j * D, (j + 1) * D)
        q = reference_rope(x_lf @ wq[rows].T, positions)
        k = reference_rope(x_lf @ wk[rows].T, positions)
        v = x @ attn.v_proj.weight[rows].T
        scores = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(future, float("-inf"))
        heads.append(scores.softmax(-1) @ v)
    return torch.cat(heads, -1) @ attn.o_proj.weight.T


# ------------------------------------------------------------------------------- the tests

def test_true_qk_weights_follow_the_index_formula():
    """Head j < H/2: query = q_proj rows [2jd, (2j+1)d), key = rows [(2j+1)d, (2j+2)d);
    head j >= H/2: the same rows of k_proj with j' = j - H/2."""
    wq, wk = torch.randn(H * D, E), torch.randn(H * D, E)
    wq_true, wk_true = true_qk_weights(wq, wk, H)
    for j in range(H):
        src, jj = (wq, j) if j < H // 2 else (wk, j - H // 2)
        assert torch.equal(wq_true[j * D:(j + 1) * D], src[2 * jj * D:(2 * jj + 1) * D])
        assert torch.equal(wk_true[j * D:(j + 1) * D], src[(2 * jj + 1) * D:(2 * jj + 2) * D])


@pytest.mark.parametrize("offset", [0, 5])
def test_attention_equals_per_head_reference_with_true_qk(offset):
    attn = randomize(YuanAttention(tiny_config())).double()
    x = torch.randn(2, 6, E, dtype=torch.float64)
    positions = (torch.arange(6) + offset).expand(2, -1)
    out, present = attn(x, position_ids=positions)
    assert present is None
    expected = reference_attention(attn, x, positions)
    # RoPE angles are computed in float32 (as in the published model): 1e-5, not 1e-12.
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # Reading q_proj/k_proj as plain query/key projections is a different model.
    naive = reference_attention(attn, x, positions, attn.q_proj.weight, attn.k_proj.weight)
    assert (out - naive).abs().max() > 1e-2


def test_lf_equals_causal_closed_form():
    lf = randomize(LocalizedFiltering(E)).double()
    x = torch.randn(2, 7, E, dtype=torch.float64)
    y = lf(x)
    assert y.shape == x.shape  # full hidden size in and out
    torch.testing.assert_close(y, reference_lf(lf, x), atol=1e-12, rtol=1e-12)
    # Causal with a window of 3: changing x[t] leaves outputs before t alone and reaches t + 2 only.
    x2 = x.clone()
    x2[:, 3] += 1.0
    changed = (lf(x2) - y).abs().amax(dim=(0, 2)) > 1e-9
    assert changed.tolist() == [False, False, False, True, True, True, False]


def test_mlp_puts_the_activation_on_up_proj():
    mlp = randomize(YuanMLP(tiny_config())).double()
    x = torch.randn(3, 5, E, dtype=torch.float64)
    up, gate, down = mlp.up_proj.weight, mlp.gate_proj.weight, mlp.down_proj.weight
    expected = (x @ gate.T * F.silu(x @ up.T)) @ down.T
    torch.testing.assert_close(mlp(x), expected, atol=1e-12, rtol=1e-12)
    llama_order = (F.silu(x @ gate.T) * (x @ up.T)) @ down.T
    assert (mlp(x) - llama_order).abs().max() > 1e-2


def expected_shapes(hidden, heads, inter, vocab, layers):
    """The notes' state-dict table (§1), for one set of sizes."""
    inner = heads * (hidden // heads)
    per_layer = {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (inner, hidden),
        "self_attn.k_proj.weight": (inner, hidden),
        "self_attn.v_proj.weight": (inner, hidden),
        "self_attn.o_proj.weight": (hidden, inner),
        "self_attn.lf_gate.conv1.weight": (hidden // 2, hidden, 2, 1),
        "self_attn.lf_gate.conv1.bias": (hidden // 2,),
        "self_attn.lf_gate.conv2.weight": (hidden, hidden // 2, 2, 1),
        "self_attn.lf_gate.conv2.bias": (hidden,),
        "self_attn.lf_gate.output_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }
    shapes = {f"model.layers.{i}.{k}": v for i in range(layers) for k, v in per_layer.items()}
    shapes.update({"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
                   "lm_head.weight": (vocab, hidden)})
    return shapes


def test_state_dict_keys_and_shapes_match_the_table():
    model = YuanForCausalLM(tiny_config())
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_shapes(E, H, I, V, L)
    # The RoPE frequencies are a buffer of d/2 values kept out of the state dict.
    buffers = dict(model.named_buffers())
    assert tuple(buffers["model.layers.0.self_attn.rotary_emb.inv_freq"].shape) == (D // 2,)
    assert not any(p.bias is not None for p in model.modules() if isinstance(p, nn.Linear))


def test_default_config_is_yuan2_2b():
    """The 2B column of the table, on the meta device; about 2.09B parameters with tied embeddings."""
    with torch.device("meta"):
        model = YuanForCausalLM(YuanConfig())
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_shapes(2048, 32, 8192, 135040, 24)
    assert got["model.layers.0.self_attn.lf_gate.conv1.weight"] == (1024, 2048, 2, 1)
    assert model.model.layers[0].self_attn.rotary_emb.inv_freq.shape == (32,)
    n_params = sum(p.numel() for p in model.parameters())
    assert 2.08e9 < n_params < 2.10e9


def test_auto_classes_build_it_and_the_loss_backpropagates():
    config = AutoConfig.for_model("yuan", **TINY)
    assert isinstance(config, YuanConfig)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, YuanForCausalLM)
    assert model.get_input_embeddings() is model.model.embed_tokens
    assert model.get_output_embeddings() is model.lm_head
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tie_word_embeddings=True

    ids = torch.randint(0, V, (2, 9))
    labels = ids.clone()
    labels[0, 4] = -100
    out = model(input_ids=ids, labels=labels)
    flat = out.logits[:, :-1].reshape(-1, V)
    expected = F.cross_entropy(flat, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.model.layers[0].self_attn.lf_gate.conv1.bias.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_untied_embeddings():
    model = YuanForCausalLM(tiny_config(tie_word_embeddings=False))
    assert model.lm_head.weight is not model.model.embed_tokens.weight


@pytest.mark.parametrize("tied", [True, False])
def test_tying_follows_the_config_through_save_and_load(tmp_path, tied):
    model = tiny_model(tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    if not tied:
        with torch.no_grad():
            model.lm_head.weight.add_(1.0)  # untied: lm_head has values of its own
    model.save_pretrained(tmp_path)
    loaded = YuanForCausalLM.from_pretrained(tmp_path)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, atol=0, rtol=0)
    torch.testing.assert_close(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight, atol=0, rtol=0)


def test_padding_row_starts_at_zero_and_gets_no_gradient():
    """As published: nn.Embedding(vocab, hidden, padding_idx=pad_token_id)."""
    torch.manual_seed(0)
    model = YuanForCausalLM(tiny_config(pad_token_id=3, tie_word_embeddings=False))
    embedding = model.model.embed_tokens
    assert embedding.padding_idx == 3
    assert torch.count_nonzero(embedding.weight[3]) == 0 and torch.count_nonzero(embedding.weight[4]) > 0
    ids = torch.tensor([[5, 3, 3, 7, 9], [3, 8, 3, 6, 5]])
    model(ids).logits.square().sum().backward()
    grad = embedding.weight.grad
    assert torch.count_nonzero(grad[3]) == 0
    assert all(torch.count_nonzero(grad[i]) > 0 for i in (5, 6, 7, 8, 9))


# End-of-document resets. The published _prepare_decoder_attention_mask_training, for each EOD
# token at index i, stops the queries after i from seeing keys 0 .. i; with reset_position_ids
# it also restarts the positions after each EOD at 0. Expected values written out by hand.
EOD = 2


def test_document_mask_by_hand():
    ids = torch.tensor([[5, EOD, 6, 7, EOD, 8],    # documents [5, EOD] [6, 7, EOD] [8]
                        [5, 6, 7, 8, 9, 4],        # no EOD: plain causal
                        [EOD, EOD, 6, 7, 8, EOD]])  # an EOD alone is a document of its own
    blocks = [
        [[1, 0, 0, 0, 0, 0],
         [1, 1, 0, 0, 0, 0],
         [0, 0, 1, 0, 0, 0],
         [0, 0, 1, 1, 0, 0],
         [0, 0, 1, 1, 1, 0],
         [0, 0, 0, 0, 0, 1]],
        [[1, 0, 0, 0, 0, 0],
         [1, 1, 0, 0, 0, 0],
         [1, 1, 1, 0, 0, 0],
         [1, 1, 1, 1, 0, 0],
         [1, 1, 1, 1, 1, 0],
         [1, 1, 1, 1, 1, 1]],
        [[1, 0, 0, 0, 0, 0],
         [0, 1, 0, 0, 0, 0],
         [0, 0, 1, 0, 0, 0],
         [0, 0, 1, 1, 0, 0],
         [0, 0, 1, 1, 1, 0],
         [0, 0, 1, 1, 1, 1]],
    ]
    causal = torch.ones(6, 6).tril().bool()
    got = document_mask(eod_counts(ids, EOD), 6) & causal
    assert got.shape == (3, 1, 6, 6)
    assert torch.equal(got[:, 0], torch.tensor(blocks, dtype=torch.bool))
    # The last two queries of the same ids, as a decoding step with four tokens cached sees them.
    assert torch.equal(document_mask(eod_counts(ids, EOD), 2)[:, 0] & causal[4:], got[:, 0, 4:])


def test_eod_reset_position_ids_by_hand():
    ids = torch.tensor([[5, EOD, 6, 7, EOD, 8], [5, 6, 7, 8, 9, 4], [EOD, EOD, 6, 7, 8, EOD]])
    assert eod_reset_position_ids(ids, EOD).tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3]]


def _doc_influence(model, ids, changed_at):
    """Max change of each position's logits when the token at ``changed_at`` changes."""
    other = ids.clone()
    other[:, changed_at] = 9 if int(ids[0, changed_at]) != 9 else 10
    with torch.no_grad():
        return (model(other).logits - model(ids).logits).abs().amax(dim=(0, 2))


@pytest.mark.parametrize("training, reset_positions, blocked", [
    (False, True, True),    # eval: the reset needs reset_position_ids, as published
    (False, False, False),
    (True, False, True),    # training: reset_attention_mask alone
])
def test_attention_does_not_cross_an_end_of_document(training, reset_positions, blocked):
    """One layer: a document's logits read earlier documents only through the LF filter's two
    tokens before it, so a token 3 before the EOD reaches the next document only through
    attention."""
    model = tiny_model(num_hidden_layers=1, eod_token=EOD, reset_attention_mask=True,
                       reset_position_ids=reset_positions).train(training)
    ids = torch.tensor([[5, 6, 7, 8, 11, EOD, 12, 13, 14, 15]])
    influence = _doc_influence(model, ids, changed_at=2)
    assert (influence[:2] == 0).all() and (influence[2:6] > 1e-4).all()  # causal within its document
    if blocked:
        assert (influence[6:] == 0).all(), influence
    else:
        assert (influence[6:] > 1e-4).all(), influence
    # The published forward computes reset positions but passes on 0 .. S - 1. RoPE is relative,
    # so positions restarted per document change nothing while attention stays in its document.
    with torch.no_grad():
        default = model(ids).logits
        torch.testing.assert_close(model(ids, position_ids=torch.arange(10)[None]).logits, default)
        reset = model(ids, position_ids=eod_reset_position_ids(ids, EOD)).logits
    torch.testing.assert_close(reset[:, :6], default[:, :6])
    if blocked:
        torch.testing.assert_close(reset, default)
    else:
        assert (reset[:, 6:] - default[:, 6:]).abs().max() > 1e-4


def test_config_fields_from_the_published_config_json():
    config = tiny_config()
    assert config.eod_token == config.eos_token_id  # default
    assert (config.reset_attention_mask, config.reset_position_ids, config.use_loss_mask) == (False, False, False)
    config = YuanConfig.from_dict({**TINY, "eod_token": 7, "sep_token": 8, "reset_attention_mask": True,
                                   "reset_position_ids": True, "causal_mask": True})
    assert (config.eod_token, config.sep_token, config.reset_attention_mask) == (7, 8, True)
    with pytest.raises(NotImplementedError, match="use_loss_mask"):
        YuanForCausalLM(tiny_config(use_loss_mask=True))
    with pytest.raises(NotImplementedError, match="lf_conv2d_num_pad"):
        YuanForCausalLM(tiny_config(lf_conv2d_num_pad=0))


def test_grouped_lf_equals_the_closed_form_with_block_diagonal_weights():
    """lf_conv2d_group = 2: each group's outputs read only its own inputs."""
    lf = randomize(LocalizedFiltering(E, groups=2)).double()
    assert lf.conv1.weight.shape == (E // 2, E // 2, 2, 1) and lf.conv2.weight.shape == (E, E // 4, 2, 1)
    dense = randomize(LocalizedFiltering(E)).double()
    with torch.no_grad():
        for conv, grouped in ((dense.conv1, lf.conv1), (dense.conv2, lf.conv2)):
            conv.weight.zero_()
            out, inp = grouped.weight.shape[0] // 2, grouped.weight.shape[1]
            for g in range(2):
                conv.weight[g * out:(g + 1) * out, g * inp:(g + 1) * inp] = grouped.weight[g * out:(g + 1) * out]
            conv.bias.copy_(grouped.bias)
        dense.output_layernorm.weight.copy_(lf.output_layernorm.weight)
    x = torch.randn(2, 6, E, dtype=torch.float64)
    torch.testing.assert_close(lf(x), reference_lf(dense, x), atol=1e-12, rtol=1e-12)


def test_save_and_load_roundtrip(tmp_path):
    model = tiny_model()
    ids = torch.randint(0, V, (2, 7))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, YuanForCausalLM) and loaded.config.model_type == "yuan"
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    # Loading really restored the weights: a fresh model differs.
    fresh = YuanForCausalLM(tiny_config()).eval()
    with torch.no_grad():
        assert (fresh(ids).logits - model(ids).logits).abs().max() > 1e-3


def test_checkpoint_with_stored_inv_freq_loads(tmp_path):
    """Some Yuan checkpoints store rotary_emb.inv_freq; it is ignored on load."""
    from safetensors.torch import save_file

    model = tiny_model()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for i in range(L):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.full((D // 2,), 7.0)
    model.config.save_pretrained(tmp_path)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = YuanForCausalLM.from_pretrained(tmp_path).eval()
    inv_freq = loaded.model.layers[0].self_attn.rotary_emb.inv_freq
    torch.testing.assert_close(inv_freq, 10000.0 ** (-torch.arange(0, D, 2).float() / D))
    ids = torch.randint(0, V, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("prompt", [1, 2, 3, 5])
@pytest.mark.parametrize("eod_reset", [False, True])
def test_cached_decoding_equals_the_full_forward(prompt, eod_reset):
    """On CPU; with EOD resets, end-of-document tokens in the prompt, the single steps and the chunk."""
    model = tiny_model(eod_token=EOD, reset_attention_mask=eod_reset, reset_position_ids=eod_reset)
    ids = torch.randint(3, V, (2, 8), generator=torch.Generator().manual_seed(0))
    ids[0, [0, 3, 6]] = EOD
    ids[1, [2, 5]] = EOD
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :prompt], use_cache=True)
        pieces, past = [out.logits], out.past_key_values
        # One token at a time, then the rest as one chunk.
        for t in range(prompt, 6):
            out = model(ids[:, t:t + 1], past_key_values=past, use_cache=True)
            pieces.append(out.logits)
            past = out.past_key_values
        pieces.append(model(ids[:, 6:], past_key_values=past).logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


def test_generate_greedy_matches_argmax_of_full_forwards():
    model = tiny_model()
    ids = torch.randint(3, V, (2, 4))
    generated = model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    seq = ids
    with torch.no_grad():
        for _ in range(5):
            next_id = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, next_id], 1)
    assert torch.equal(generated, seq)


def test_attention_mask_and_position_ids():
    model = tiny_model()
    ids = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        plain = model(ids).logits
        torch.testing.assert_close(model(ids, attention_mask=torch.ones(2, 6, dtype=torch.long)).logits, plain)
        default_positions = torch.arange(6).expand(2, -1)
        torch.testing.assert_close(model(ids, position_ids=default_positions).logits, plain)
        # RoPE is relative: shifting every position changes nothing, spreading them does.
        torch.testing.assert_close(model(ids, position_ids=default_positions + 3).logits, plain)
        assert (model(ids, position_ids=default_positions * 2).logits - plain).abs().max() > 1e-4
        # A padded key is not attended to: masking key 1 changes later positions, not position 0.
        mask = torch.ones(2, 6, dtype=torch.long)
        mask[:, 1] = 0
        masked = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(masked[:, 0], plain[:, 0])
        assert (masked[:, 2:] - plain[:, 2:]).abs().max() > 1e-4
        with pytest.raises(ValueError, match="attention_mask"):
            model(ids, attention_mask=torch.ones(2, 1, 6, 6))


def test_attention_runs_on_a_slice_of_heads():
    """Tensor parallelism replaces q/k/v/o_proj with per-rank slices. With q_proj/k_proj cut
    into contiguous row blocks and v/o permuted per the notes (DeepSpeed's
    shard_value_with_share_qk), the sum of the per-rank outputs is the full attention; the
    unpermuted v/o is not."""
    attn = randomize(YuanAttention(tiny_config())).double()
    x = torch.randn(2, 5, E, dtype=torch.float64)
    positions = torch.arange(5).expand(2, -1)
    full, _ = attn(x, position_ids=positions)

    tp = 2
    n = H // (2 * tp)
    head_perm = torch.arange(H).view(2, tp, n).transpose(0, 1).reshape(H)
    row_perm = (head_perm[:, None] * D + torch.arange(D)).reshape(-1)

    def sharded_sum(v_weight, o_weight):
        total = 0
        rows = E // tp
        for r in range(tp):
            local = copy.deepcopy(attn)
            block = slice(r * rows, (r + 1) * rows)
            for name, weight in [("q_proj", attn.q_proj.weight[block]), ("k_proj", attn.k_proj.weight[block]),
                                 ("v_proj", v_weight[block]), ("o_proj", o_weight[:, block])]:
                linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=torch.float64)
                linear.weight = nn.Parameter(weight.detach().clone())
                setattr(local, name, linear)
            total = total + local(x, position_ids=positions)[0]
        return total

    permuted = sharded_sum(attn.v_proj.weight[row_perm], attn.o_proj.weight[:, row_perm])
    torch.testing.assert_close(permuted, full, atol=1e-12, rtol=1e-12)
    naive = sharded_sum(attn.v_proj.weight, attn.o_proj.weight)
    assert (naive - full).abs().max() > 1e-2


def test_use_shareqk_is_refused():
    with pytest.raises(NotImplementedError):
        YuanAttention(tiny_config(use_shareqk=True))
