"""Yuan 2.0 (IEIT Yuan), a decoder-only causal LM, written for this project.

Transformers does not ship Yuan 2.0: the published checkpoints (for example
``IEITYuan/Yuan2-2B-hf``) carry their model as remote code. This module is our own
implementation, written from the public Yuan 2.0 description (the IEIT-Yuan/Yuan-2.0
repository: its Hugging Face model file, ``configuration_yuan.py``, the Megatron training
code and the Megatron-to-HF converter) as summarised in the project's architecture notes.
It keeps the Hugging Face parameter names, so a Yuan2 HF checkpoint's state dict loads into
it, and importing it registers ``model_type="yuan"`` with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM``.

The quirks that set Yuan apart from LLaMA:

* **Shared q/k projection.** ``q_proj`` and ``k_proj`` are not the query and key projections.
  Megatron trains one fused E -> 2·H·d projection whose output is read per head as
  ``[query_h | key_h]``; the converter cut that weight in two halves along the rows. So the
  model concatenates ``q_proj(x)`` and ``k_proj(x)``, views the result as H heads of 2·d and
  chunks each head into query and key. Head j's query is block 2j of the concatenation and its
  key block 2j+1; its value is ``v_proj`` block j.
* **Localized filtering (LF) on q/k only.** Before ``q_proj``/``k_proj`` the normed hidden
  states go through ``lf_gate``: two causal convolutions along the sequence (kernel 2, the
  channels being the full hidden size), a residual and an RMSNorm. ``v_proj`` reads the input
  of the filter, not its output.
* **SwiGLU with the activation on ``up_proj``:** ``down(gate(x) * silu(up(x)))``, where LLaMA
  has ``down(silu(gate(x)) * up(x))``.
* All linears are bias-free; the two LF convolutions have biases. Word embeddings are tied by
  default. RoPE uses base 10000 over the whole head dimension (rotate-half layout).

Written for tensor parallelism: attention derives its number of heads from the tensors it is
given (``view(B, S, -1, 2 * head_dim)``), so a rank whose q/k/v/o projections hold H/T heads
runs the same code. The LF filter reads and returns the full hidden size (tp may shard its
convolutions' channels inside it).

As in the published model:

* **End-of-document resets.** In training mode, or when ``config.reset_position_ids`` is set,
  and with ``config.reset_attention_mask``, a token does not attend across an end-of-document
  token (``config.eod_token``): each document is its own causal block (``document_mask``).
  The published forward computes EOD-reset position ids too, but discards them and uses
  ``0 .. S - 1``; so does this one (``eod_reset_position_ids`` gives them to callers that
  want to pass them as ``position_ids``). The LF filter runs across document boundaries.
* The embedding's ``padding_idx`` is ``config.pad_token_id``: that row starts at zero and
  gets no gradient.
* ``lm_head`` is tied to the embedding exactly when ``config.tie_word_embeddings``.

Not implemented: the ``use_shareqk=True`` alternative (raises), flash attention (the eager
math is used for every config), the loss mask of ``use_loss_mask`` and the convolution
padding of ``lf_conv2d_num_pad`` other than 1 (both raise). Incremental decoding works
through ``past_key_values``: one ``(key, value, lf_memory, eod_counts)`` tuple per layer
(see ``YuanModel.forward``), not a transformers ``Cache``; ``generate()`` uses it, on any
device. With left padding, the LF filter of the first real tokens sees the padding's
embeddings, as in the published model.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
)

# RoPE base: the Yuan2 HF code hard-codes the default and has no rope_theta in its config.
ROPE_BASE = 10000.0
# The LF's own RMSNorm is built with the class default eps, not config.rms_norm_eps.
LF_NORM_EPS = 1e-6
# The LF window: its output at t depends on its inputs at t-2, t-1 and t (two kernel-2 convs).
LF_CONTEXT = 2


class YuanConfig(PretrainedConfig):
    """Configuration of a Yuan 2.0 model; the defaults describe Yuan2-2B.

    Field names and defaults follow the published ``configuration_yuan.py``. The fields the
    published modeling code reads from the checkpoints' ``config.json`` have defaults here:
    ``max_position_embeddings`` 8192 (the 2B training length), ``eod_token`` (the
    end-of-document id; default: ``eos_token_id``), ``sep_token`` 77187 (read only by the
    loss mask), ``reset_attention_mask`` and ``reset_position_ids`` False (see
    ``document_mask``), ``use_loss_mask`` False (True is refused), ``lf_conv2d_group`` 1
    (the LF convolutions' groups, a Megatron option that later Yuan variants store) and
    ``lf_conv2d_num_pad`` 1 (only 1 is implemented). Other keys (``causal_mask``,
    ``use_flash_attention``) are kept as plain attributes and ignored.

    Example::
        >>> config = YuanConfig(hidden_size=64, num_attention_heads=8, intermediate_size=128,
        ...                     num_hidden_layers=2, vocab_size=256, pad_token_id=0, bos_token_id=1,
        ...                     eos_token_id=2, reset_attention_mask=True, reset_position_ids=True)
        >>> config.eod_token  # the eos id unless given
        2
        >>> YuanForCausalLM(config)(torch.tensor([[5, 6, 2, 7, 8]])).logits.shape
        torch.Size([1, 5, 256])
    """

    model_type = "yuan"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 135040,
        hidden_size: int = 2048,
        intermediate_size: int = 8192,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 32,
        hidden_act: str = "silu",
        model_max_length: int = 8192,
        max_position_embeddings: int = 8192,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = 77185,
        bos_token_id: int | None = 77185,
        eos_token_id: int | None = 77185,
        tie_word_embeddings: bool = True,
        use_shareqk: bool = False,
        eod_token: int | None = None,
        sep_token: int | None = 77187,
        reset_attention_mask: bool = False,
        reset_position_ids: bool = False,
        use_loss_mask: bool = False,
        lf_conv2d_group: int = 1,
        lf_conv2d_num_pad: int = 1,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.hidden_act = hidden_act
        self.model_max_length = model_max_length
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        # Set here rather than passed on: newer transformers drop a `use_cache` kwarg as a
        # generation parameter.
        self.use_cache = use_cache
        self.use_shareqk = use_shareqk
        self.eod_token = eos_token_id if eod_token is None else eod_token
        self.sep_token = sep_token
        self.reset_attention_mask = reset_attention_mask
        self.reset_position_ids = reset_position_ids
        self.use_loss_mask = use_loss_mask
        self.lf_conv2d_group = lf_conv2d_group
        self.lf_conv2d_num_pad = lf_conv2d_num_pad
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )


class YuanRMSNorm(nn.Module):
    """RMSNorm: x / sqrt(mean(x²) + eps) computed in float32 (or wider), then times the weight."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.promote_types(input_dtype, torch.float32))
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class YuanRotaryEmbedding(nn.Module):
    """Rotary position embedding over the whole head dimension (base 10000, rotate-half layout).

    ``inv_freq`` is a non-persistent buffer: some Yuan checkpoints store it, and loading
    ignores it (the values are a function of ``dim`` and the base). cos/sin are computed from
    ``position_ids`` on each call, so there is no cache length to outgrow;
    ``max_position_embeddings`` is kept for information.
    """

    def __init__(self, dim: int, max_position_embeddings: int = 8192, base: float = ROPE_BASE):
        super().__init__()
        self.dim = dim
        self.max_position_embeddings = max_position_embeddings
        self.base = base
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim
        return 1.0 / (self.base**exponents)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape [B, 1, S, dim] (broadcast over heads), for ``position_ids`` [B, S]."""
        freqs = position_ids[..., None].float() * self.inv_freq.float().to(position_ids.device)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def causal_key_mask(seq_len: int, past_len: int, device=None) -> torch.Tensor:
    """Boolean [1, 1, S, past + S]: query i, at position past + i, may see keys 0 .. past + i."""
    query_pos = torch.arange(past_len, past_len + seq_len, device=device)[:, None]
    return (torch.arange(past_len + seq_len, device=device)[None, :] <= query_pos)[None, None]


def eod_counts(input_ids: torch.Tensor, eod_token: int) -> torch.Tensor:
    """[B, S]: how many end-of-document tokens there are up to and including each position."""
    return (input_ids == eod_token).long().cumsum(-1)


def document_mask(counts: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Boolean [B, 1, S, T]: the last S of T tokens may see the earlier tokens of their own document.

    ``counts`` [B, T] are ``eod_counts`` over every token (cached and new). A token's document
    is the number of end-of-document tokens strictly before it, so an EOD token closes its own
    document: the published mask blocks, for each EOD at i, queries after i from keys 0 .. i.
    Combine it with the causal mask.
    """
    documents = F.pad(counts, (1, 0))[:, :-1]
    return (documents[:, -seq_len:, None] == documents[:, None, :])[:, None]


def eod_reset_position_ids(input_ids: torch.Tensor, eod_token: int) -> torch.Tensor:
    """[B, S]: positions counted from the start of each token's document (0 after each EOD).

    What the published ``_prepare_decoder_attention_mask_training`` computes with
    ``reset_position_ids``; its forward (and ``YuanModel.forward``) does not apply them, so
    pass them as ``position_ids`` to train as Megatron's data loader does.

    Example::
        >>> eod_reset_position_ids(torch.tensor([[5, 2, 6, 7, 2, 8]]), eod_token=2)
        tensor([[0, 1, 0, 1, 2, 0]])
    """
    steps = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
    # A document starts right after each EOD; each token's start is the latest one before it.
    starts_after = torch.where(input_ids == eod_token, steps + 1, 0)
    starts = F.pad(starts_after, (1, 0))[..., :-1].cummax(-1).values
    return steps - starts


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class LocalizedFiltering(nn.Module):
    """Yuan's localized filtering: two causal kernel-2 convolutions along the sequence, a
    residual and an RMSNorm, over the full hidden size.

    With x the input at positions t (x[-1] = 0, y1[-1] = 0):
        y1[t] = W1[:, :, 0, 0] x[t-1] + W1[:, :, 1, 0] x[t] + b1       (E -> E/2)
        y2[t] = W2[:, :, 0, 0] y1[t-1] + W2[:, :, 1, 0] y1[t] + b2     (E/2 -> E)
        out[t] = output_layernorm(y2[t] + x[t])
    The convolutions are ``nn.Conv2d`` over [B, E, S, 1] (channels = hidden, height =
    sequence) to keep the checkpoints' weight shapes [E/2, E, 2, 1] and [E, E/2, 2, 1]:
    padding one row on each side and keeping the first S outputs makes them causal. With
    ``groups`` (Megatron's ``lf_conv2d_group``) G > 1 both are grouped convolutions: W1 and W2
    are block-diagonal over G groups of channels.

    Example::
        >>> LocalizedFiltering(64)(torch.randn(2, 5, 64)).shape
        torch.Size([2, 5, 64])
    """

    def __init__(self, hidden_size: int, groups: int = 1, num_pad: int = 1):
        super().__init__()
        if hidden_size % (2 * groups):
            raise ValueError(f"LocalizedFiltering needs a hidden size divisible by 2 x {groups} groups, "
                             f"got {hidden_size}")
        if num_pad != 1:
            raise NotImplementedError(f"LocalizedFiltering: lf_conv2d_num_pad={num_pad}; only 1 is implemented")
        self.embed_dim = hidden_size
        self.lf_conv2d_group = groups
        self.lf_conv2d_num_pad = num_pad
        self.conv1 = nn.Conv2d(hidden_size, hidden_size // 2, (2, 1), stride=(1, 1), padding=(1, 0), groups=groups)
        self.conv2 = nn.Conv2d(hidden_size // 2, hidden_size, (2, 1), stride=(1, 1), padding=(1, 0), groups=groups)
        self.output_layernorm = YuanRMSNorm(hidden_size, eps=LF_NORM_EPS)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, S, E] -> [B, S, E]; position t sees inputs t-2..t only."""
        seq_len = hidden_states.shape[1]
        # [B, S, E] -> [B, E, S, 1]: channels first, the sequence as the conv's height.
        grid = hidden_states.transpose(1, 2).unsqueeze(-1)
        # Padding gives S + 1 outputs; output t reads inputs t-1 and t, so the first S are causal.
        filtered = self.conv1(grid)[:, :, :seq_len]
        filtered = self.conv2(filtered)[:, :, :seq_len]
        filtered = filtered.squeeze(-1).transpose(1, 2)
        return self.output_layernorm(filtered + hidden_states)


class YuanAttention(nn.Module):
    """Causal self-attention with Yuan's localized filtering and shared q/k projection.

    ``hidden_size``, ``num_heads`` and ``head_dim`` describe the unsharded model and are kept
    for information; ``forward`` uses only ``head_dim`` and takes the number of heads from the
    projections' output shapes, so a tensor-parallel rank with a slice of the heads in
    q/k/v/o_proj needs no attribute changes.
    """

    def __init__(self, config: YuanConfig):
        super().__init__()
        if getattr(config, "use_shareqk", False):
            raise NotImplementedError("YuanAttention: the use_shareqk=True variant is not implemented")
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_heads}"
            )
        self.head_dim = self.hidden_size // self.num_heads
        inner = self.num_heads * self.head_dim
        # Construction order as in the published model (it decides the order of the parameters).
        self.v_proj = nn.Linear(self.hidden_size, inner, bias=False)
        self.o_proj = nn.Linear(inner, self.hidden_size, bias=False)
        self.rotary_emb = YuanRotaryEmbedding(self.head_dim, config.max_position_embeddings)
        self.lf_gate = LocalizedFiltering(self.hidden_size, getattr(config, "lf_conv2d_group", 1),
                                          getattr(config, "lf_conv2d_num_pad", 1))
        self.q_proj = nn.Linear(self.hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(self.hidden_size, inner, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_value: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        use_cache: bool = False,
    ):
        """Args:
            hidden_states: [B, S, E], the input_layernorm output.
            position_ids: [B, S] positions for RoPE.
            attention_mask: boolean [B or 1, 1, S, past + S], True where a query may attend;
                None: causal.
            past_key_value: ``(key, value, lf_memory, ...)`` from the previous call, or None.
        Returns ``(output [B, S, E], present)``; present is None unless ``use_cache``.
        """
        batch, seq_len = hidden_states.shape[:2]
        head_dim = self.head_dim

        # V comes from the attention input itself, not from the filtered states.
        value = self.v_proj(hidden_states).view(batch, seq_len, -1, head_dim).transpose(1, 2)

        # The filter needs the two inputs before the first new token: during decoding they come
        # from the cache. Filtering [memory, new] and keeping the last S outputs is exact, and at
        # the start of the sequence (memory shorter than 2) the zero padding is the definition.
        lf_input = hidden_states if past_key_value is None else torch.cat([past_key_value[2], hidden_states], 1)
        filtered = self.lf_gate(lf_input)[:, -seq_len:]

        # Shared q/k: per head, the concatenated projections hold [query | key].
        query_key = torch.cat([self.q_proj(filtered), self.k_proj(filtered)], dim=-1)
        query_key = query_key.view(batch, seq_len, -1, 2 * head_dim)
        query, key = query_key.chunk(2, dim=-1)
        query, key = query.transpose(1, 2), key.transpose(1, 2)

        cos, sin = self.rotary_emb(position_ids, dtype=query.dtype)
        query, key = apply_rotary_pos_emb(query, key, cos, sin)

        if past_key_value is not None:
            key = torch.cat([past_key_value[0], key], dim=2)
            value = torch.cat([past_key_value[1], value], dim=2)
        present = (key, value, lf_input[:, -LF_CONTEXT:]) if use_cache else None

        if attention_mask is None:
            attention_mask = causal_key_mask(seq_len, key.shape[2] - seq_len, key.device)
        scores = torch.matmul(query, key.transpose(2, 3)) / math.sqrt(head_dim)
        # Softmax in float32 (or wider); masked scores get the most negative float (not -inf),
        # so a row with no allowed key (a padded query) gives a finite output instead of NaN.
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1).to(value.dtype)
        attended = torch.matmul(probs, value).transpose(1, 2).reshape(batch, seq_len, -1)
        return self.o_proj(attended), present


class YuanMLP(nn.Module):
    """Gated MLP with the activation on ``up_proj``: down(gate(x) * act(up(x)))."""

    def __init__(self, config: YuanConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Megatron's swiglu is silu(chunk0) * chunk1 and the converter maps chunk0 to up_proj.
        return self.down_proj(self.gate_proj(hidden_states) * self.act_fn(self.up_proj(hidden_states)))


class YuanDecoderLayer(nn.Module):
    """Pre-norm block: h + attn(norm(h)), then h + mlp(norm(h))."""

    def __init__(self, config: YuanConfig):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = YuanAttention(config)
        self.mlp = YuanMLP(config)
        self.input_layernorm = YuanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = YuanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_ids, attention_mask=None, past_key_value=None, use_cache=False):
        residual = hidden_states
        # The hidden states go in first and positionally, where block-input styles look for them.
        attn_out, present = self.self_attn(
            self.input_layernorm(hidden_states),
            position_ids=position_ids,
            attention_mask=attention_mask,
            past_key_value=past_key_value,
            use_cache=use_cache,
        )
        hidden_states = residual + attn_out
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, present


def _copy_unless_loaded(tensor: torch.Tensor, value: torch.Tensor) -> None:
    # transformers >= 5 flags tensors read from a checkpoint; those must not be overwritten.
    if not getattr(tensor, "_is_hf_initialized", False):
        with torch.no_grad():
            tensor.copy_(value)


class YuanPreTrainedModel(PreTrainedModel):
    config_class = YuanConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules: ClassVar[list[str]] = ["YuanDecoderLayer"]
    # Older checkpoints store the RoPE frequencies; they are recomputed, not loaded.
    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = [r"rotary_emb\.inv_freq"]

    def _init_weights(self, module: nn.Module) -> None:
        # torch.nn.init is looked up at call time, so transformers' guards (which skip loaded
        # tensors) apply to these calls.
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, YuanRMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, YuanRotaryEmbedding):
            _copy_unless_loaded(module.inv_freq, module.compute_inv_freq().to(module.inv_freq.device))


class YuanModel(YuanPreTrainedModel):
    """Embeddings, decoder layers and the final norm; returns the last hidden states.
    (``get_input_embeddings`` and the rest are PreTrainedModel's, which find ``embed_tokens``
    and ``lm_head`` by name.)"""

    def __init__(self, config: YuanConfig):
        super().__init__(config)
        if getattr(config, "use_loss_mask", False):
            raise NotImplementedError("YuanModel: use_loss_mask=True (the loss only on answers after sep_token) "
                                      "is not implemented")
        # As published: the pad row (Yuan's pad id is also its eos id) gets no gradient.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(YuanDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = YuanRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: tuple | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Args:
            attention_mask: None, or a 2D [B, past + S] mask of 1 (token) / 0 (padding) over
                the cached and the new tokens; it is combined with the causal mask. The LF
                filter does not look at it (as in the published model).
            position_ids: [B, S]; default past + 0 .. past + S - 1, also with EOD resets (as
                published; see ``eod_reset_position_ids``).
            past_key_values: the ``past_key_values`` of a previous call to continue a sequence:
                one ``(key, value, lf_memory, eod_counts)`` tuple per layer, where lf_memory
                holds the LF inputs of the last two tokens and eod_counts [B, past] (the same
                tensor in every layer) the ``eod_counts`` of the ids so far.
            use_cache: return ``past_key_values``; default ``config.use_cache``.

        In training mode or with ``config.reset_position_ids``, and with
        ``config.reset_attention_mask``, tokens see only their own document
        (``document_mask``); given ``inputs_embeds`` instead of ids, there are no EOD tokens to see.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if past_key_values is not None and not isinstance(past_key_values, (tuple, list)):
            raise TypeError(
                f"past_key_values must be the tuple this model returned, not {type(past_key_values).__name__}"
            )
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        batch, seq_len = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]

        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + seq_len, device=device).unsqueeze(0).expand(batch, -1)
        allowed = self._allowed_keys(attention_mask, seq_len, past_len, device)
        counts = self._eod_counts(input_ids, past_key_values, batch, seq_len, device)
        if self.config.reset_attention_mask and (self.training or self.config.reset_position_ids):
            allowed = allowed & document_mask(counts, seq_len)

        hidden_states = inputs_embeds
        presents = []
        for index, layer in enumerate(self.layers):
            hidden_states, present = layer(
                hidden_states,
                position_ids=position_ids,
                attention_mask=allowed,
                past_key_value=None if past_key_values is None else past_key_values[index],
                use_cache=use_cache,
            )
            presents.append(None if present is None else (*present, counts))
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, past_key_values=tuple(presents) if use_cache else None
        )

    def _eod_counts(self, input_ids, past_key_values, batch: int, seq_len: int, device) -> torch.Tensor:
        """``eod_counts`` [B, past + S] of the cached and the new tokens (none counted without ids)."""
        new = (torch.zeros(batch, seq_len, dtype=torch.long, device=device) if input_ids is None
               else eod_counts(input_ids, self.config.eod_token))
        if past_key_values is None:
            return new
        past = past_key_values[0][3]
        return torch.cat([past, new + past[:, -1:]], dim=1)

    @staticmethod
    def _allowed_keys(attention_mask, seq_len: int, past_len: int, device) -> torch.Tensor:
        """Boolean [B or 1, 1, S, past + S]: query i (at past + i) sees keys 0 .. past + i that
        are not padding."""
        total = past_len + seq_len
        allowed = causal_key_mask(seq_len, past_len, device)
        if attention_mask is None:
            return allowed
        if attention_mask.dim() != 2 or attention_mask.shape[-1] != total:
            raise ValueError(
                f"attention_mask must be 2D [batch, {total}] (cached + new tokens), "
                f"got shape {tuple(attention_mask.shape)}"
            )
        return allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]


class YuanForCausalLM(YuanPreTrainedModel, GenerationMixin):
    """Yuan decoder with an LM head; ``labels`` give the shifted next-token cross-entropy."""

    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # The LF memory does not fit transformers' Cache classes: generate() must keep passing
        # back the tuples this model returns.
        return False

    def __init__(self, config: YuanConfig):
        super().__init__(config)
        self.model = YuanModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: tuple | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """See ``YuanModel.forward``. ``labels`` [B, S] are the input ids (positions to skip:
        -100); the loss predicts token t + 1 from position t, averaged over counted tokens.
        transformers 5.24's ``generate`` passes the returned tuples back as ``cache``."""
        if past_key_values is None:
            past_key_values = kwargs.get("cache")
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            # Shift the labels rather than the logits: no slice of the (possibly vocab-sharded)
            # logits is needed.
            shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].to(logits.device)
            flat_logits = logits.float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(flat_logits, shifted.reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values)


def _register_auto_classes() -> None:
    # exist_ok: importing this module again (a reload) re-registers the same names.
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register("yuan", YuanConfig, exist_ok=True)
    AutoModel.register(YuanConfig, YuanModel, exist_ok=True)
    AutoModelForCausalLM.register(YuanConfig, YuanForCausalLM, exist_ok=True)


_register_auto_classes()

__all__ = [
    "LocalizedFiltering",
    "YuanAttention",
    "YuanConfig",
    "YuanDecoderLayer",
    "YuanForCausalLM",
    "YuanMLP",
    "YuanModel",
    "YuanPreTrainedModel",
    "YuanRMSNorm",
    "YuanRotaryEmbedding",
    "document_mask",
    "eod_counts",
    "eod_reset_position_ids",
]
