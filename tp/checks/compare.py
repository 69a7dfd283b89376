"""How a sharded model is compared with the unsharded one: the inputs, the mode, the
tolerances and the errors of logits and gradients. ``tp.verify`` and the trial of an inferred
plan both use it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..sharding.gather import full_parameters, full_tensor

LOGITS_ATOL = 1e-5
GRAD_RTOL = 1e-4
# A gradient's error is measured against its own largest entry, but never against less than
# this fraction of the model's largest gradient entry: some gradients are zero in exact
# arithmetic (a key bias, under softmax) and hold only rounding noise.
GRAD_SCALE_FLOOR = 1e-3

# Model types whose eval-mode forward cannot be differentiated: RWKV updates its recurrent state
# in place when not training. Their checks run in training mode (their tiny configs drop nothing).
TRAINING_MODE_ONLY = {"rwkv"}


def for_checking(model: nn.Module) -> nn.Module:
    """``model`` in the mode a forward-and-backward check runs it: eval, unless it cannot."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model.train(model_type in TRAINING_MODE_ONLY)


def takes_token_ids(model: nn.Module) -> bool:
    """Whether a check can feed ``model`` token ids: it has a token embedding."""
    return isinstance(getattr(model, "get_input_embeddings", lambda: None)(), nn.Embedding)


def token_ids(model: nn.Module, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Random token ids that both the input embedding and the logits cover (CPM-Ant's embedding
    also holds prompt tokens the vocabulary lacks), avoiding the special ids 0-2."""
    vocab = model.get_input_embeddings().num_embeddings
    head = getattr(model, "get_output_embeddings", lambda: None)()
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for limit in (getattr(head, "out_features", None), getattr(text, "vocab_size", None)):
        if isinstance(limit, int) and limit > 0:
            vocab = min(vocab, limit)
    return torch.randint(min(3, vocab - 1), vocab, shape, generator=generator)


def max_rel(a: torch.Tensor, b: torch.Tensor, floor: float) -> float:
    """The largest difference, relative to ``b``'s largest entry (at least ``floor``)."""
    scale = max(b.abs().max().item(), floor)
    return (a - b).abs().max().item() / scale if scale > 0 else (a - b).abs().max().item()


def logits_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """The largest absolute difference of the (gathered) logits."""
    return (full_tensor(logits) - reference).abs().max().item()


def gradient_errors(reference: nn.Module, sharded: nn.Module) -> dict[str, float]:
    """Parameter name -> relative error of its gathered gradient. A parameter the input does not
    reach has no gradient on either side and is left out; one side missing is infinitely wrong."""
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    floor = GRAD_SCALE_FLOOR * max((g.abs().max().item() for g in ref_grads.values() if g is not None and g.numel()),
                                   default=0.0)
    errors = {}
    for name, grad in full_parameters(sharded, grads=True).items():
        ref_grad = ref_grads[name]
        if grad is None or ref_grad is None:
            if (grad is None) != (ref_grad is None):
                errors[name] = float("inf")
            continue
        errors[name] = max_rel(grad, ref_grad, floor)
    return errors


def model_inputs(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Keyword arguments for one forward with a loss: a causal LM reads ``ids`` and predicts them.
    An encoder-decoder model encodes ``ids`` and decodes labels of half their length (reversed),
    so that cross-attention sees queries and keys of different lengths; the model shifts the labels
    into ``decoder_input_ids``. A speech encoder (Whisper) reads seeded random features
    ``[batch, num_mel_bins, 2 * max_source_positions]`` instead of ``ids``."""
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        return {"input_ids": ids, "labels": ids}
    labels = ids.flip(-1)[:, : max(ids.shape[-1] // 2, 1)].contiguous()
    if getattr(model, "main_input_name", "input_ids") == "input_features":
        shape = (ids.shape[0], config.num_mel_bins, 2 * config.max_source_positions)
        features = torch.randn(shape, generator=torch.Generator().manual_seed(int(ids.sum())))
        return {"input_features": features, "labels": labels}
    return {"input_ids": ids, "labels": labels}
