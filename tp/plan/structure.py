"""What tp reads from a model's module structure: its repeated blocks and its norms."""

from __future__ import annotations

from torch import nn

SEQUENCE_DIM = 1  # [batch, sequence, features], as Hugging Face models hold activations


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith("Norm")


def find_blocks(model: nn.Module) -> list[str]:
    """Paths of the repeated blocks: the children of the largest list of modules (hybrid models
    mix block classes, attention and state-space layers, in one list). A list beside the token
    embedding is preferred: a multimodal model's audio or vision encoder may be larger than its
    text decoder in a small configuration."""
    embed = getattr(model, "get_input_embeddings", lambda: None)()
    names = {m: n for n, m in model.named_modules()}
    beside = names[embed].rpartition(".")[0] if embed in names else None
    best, best_key = None, None
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module):
            key = (path.rpartition(".")[0] == beside, sum(p.numel() for p in module.parameters()))
            if key[1] and (best_key is None or key > best_key):
                best, best_key = path, key
    if best is None:
        return []
    return [f"{best}.{i}" for i in range(len(model.get_submodule(best)))]
