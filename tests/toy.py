"""A small decoder written the old way: attention stores its head count and views with it.

Models like this need their per-rank head count divided (the registry's ``divide`` key).
"""

from types import SimpleNamespace

import torch.nn.functional as F
from torch import nn


class ToyAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.num_heads, self.head_dim = heads, hidden // heads
        self.qkv_q = nn.Linear(hidden, hidden)
        self.qkv_k = nn.Linear(hidden, hidden)
        self.qkv_v = nn.Linear(hidden, hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (m(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
                   for m in (self.qkv_q, self.qkv_k, self.qkv_v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


class ToyBlock(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attn = ToyAttention(hidden, heads)
        self.up, self.down = nn.Linear(hidden, 2 * hidden), nn.Linear(2 * hidden, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class ToyLM(nn.Module):
    def __init__(self, vocab: int = 96, hidden: int = 48, heads: int = 6, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(ToyBlock(hidden, heads) for _ in range(layers))
        self.head = nn.Linear(hidden, vocab, bias=False)

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, labels=None):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        logits = self.head(x)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()) if labels is not None else None
        return SimpleNamespace(logits=logits, loss=loss)


def make_toy() -> ToyLM:
    return ToyLM()


# Its family, for a user registry: `divide` sets the per-rank head count the model stores.
TOY_REGISTRY = """
[families.toy]
classes = ["ToyLM"]
divide = ["attn.num_heads"]

[families.toy.plan]
"embed" = "embedding"
"attn.qkv_*" = "colwise"
"attn.proj" = "rowwise"
"up" = "colwise"
"down" = "rowwise"
"head" = "lm_head"
"""
