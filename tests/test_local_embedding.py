"""The vocab-parallel embedding and lm_head compute on local tensors (tp/styles/local_embedding.py,
``LocalLmHead`` in tp/styles/local_linear.py): they match the unsharded modules forward and backward
(an uneven vocabulary, a rank with no rows, a padding row), run no DTensor operation in the forward,
cost one all-reduce (embedding) and one all-gather (logits) forward and one all-reduce backward,
and keep a tied embedding and lm_head one Shard(0) DTensor through tp.apply."""

import copy

import pytest
import torch
from torch import nn
from torch.distributed.tensor import Shard

import tp
from tests.test_local_linear import DTensorOps
from tp.testing.counter import CollectiveCounter


class EmbedAndHead(nn.Module):
    def __init__(self, vocab: int, padding_idx: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, 8, padding_idx=padding_idx)
        self.head = nn.Linear(8, vocab)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)))


def _relative_grad_differences(model: nn.Module, reference: nn.Module) -> dict[str, float]:
    ref = dict(reference.named_parameters())
    return {n: ((tp.full_tensor(p.grad) - ref[n].grad).abs().max() / ref[n].grad.abs().max()).item()
            for n, p in model.named_parameters()}


def _toy_on_rank(vocab: int, padding_idx: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from tp.styles.local_embedding import LocalEmbedding
    from tp.styles.local_linear import LocalLmHead

    torch.manual_seed(0)
    reference = EmbedAndHead(vocab, padding_idx)
    model = parallelize_module(copy.deepcopy(reference), init_device_mesh("cpu", (dist.get_world_size(),)),
                               {"embed": LocalEmbedding(), "head": LocalLmHead()})
    ids = torch.cat([torch.arange(vocab), torch.randint(0, vocab, (2 * vocab,))]).reshape(3, vocab)

    with CollectiveCounter() as forward, DTensorOps() as dtensor_ops:
        out = model(ids)
    plain_output = type(out) is torch.Tensor
    out.mul_(2.0)  # the model may change the logits in place
    ref_out = reference(ids).mul_(2.0)
    with CollectiveCounter() as backward:
        out.square().sum().backward()
    ref_out.square().sum().backward()
    return {"out": (out - ref_out).abs().max().item(), "grads": _relative_grad_differences(model, reference),
            "padding_row_grad": tp.full_tensor(model.embed.weight.grad)[padding_idx].abs().max().item(),
            "local_rows": model.embed.weight.to_local().shape[0], "dtensor_ops_in_forward": dtensor_ops.ops,
            "plain_output": plain_output, "forward": dict(forward.counts()), "backward": dict(backward.counts())}


@pytest.mark.parametrize("pool_name, vocab, padding_idx, rows", [
    ("pool2", 33, 20, [17, 16]),       # uneven, the padding row on rank 1
    ("pool4", 9, 7, [3, 3, 3, 0]),     # rank 3 holds no rows (torch.chunk's split, as DTensor's)
])
def test_embedding_and_lm_head_on_local_tensors(pool_name, vocab, padding_idx, rows, request):
    results = request.getfixturevalue(pool_name).run(_toy_on_rank, vocab, padding_idx)
    assert [r["local_rows"] for r in results] == rows
    for r in results:
        # float32: logits 1e-6 absolute, gradients 1e-6 relative to the largest (sums in another order)
        assert r["out"] <= 1e-6 and max(r["grads"].values()) <= 1e-6, r
        assert r["padding_row_grad"] == 0.0, r
        assert r["dtensor_ops_in_forward"] == [] and r["plain_output"], r
        assert r["forward"] == {"all_reduce": 1, "all_gather": 1} and r["backward"] == {"all_reduce": 1}, r


def _tied_llama_on_rank() -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from tp.testing.models import tiny_model

    reference = tiny_model("llama", vocab_size=32001, tie_word_embeddings=True, pad_token_id=16005).float()
    model = copy.deepcopy(reference)
    tp.apply(model, init_device_mesh("cpu", (dist.get_world_size(),)))
    embedding = model.model.embed_tokens.weight
    ids = torch.randint(0, 32001, (2, 12), generator=torch.Generator().manual_seed(1))
    ids[0, :4] = torch.tensor([0, 16000, 16001, 32000])  # both sides of the 16001 + 16000 split

    with CollectiveCounter() as forward, DTensorOps() as dtensor_ops:
        out = model(input_ids=ids, labels=ids)
    ref_out = reference(input_ids=ids, labels=ids)
    with CollectiveCounter() as backward:
        out.loss.backward()
    ref_out.loss.backward()
    grads = _relative_grad_differences(model, reference)

    # one AdamW step with clipping moves the tied weight as it moves the unsharded one
    for m in (model, reference):
        optimizer = torch.optim.AdamW(m.parameters(), lr=1e-2)
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        optimizer.step()
    return {"tied": model.lm_head.weight is embedding, "placements": tuple(embedding.placements),
            "local_rows": embedding.to_local().shape[0], "logits": (out.logits - ref_out.logits).abs().max().item(),
            "loss": abs(out.loss.item() - ref_out.loss.item()), "worst_grad_rel": max(grads.values()),
            "dtensor_ops_in_forward": dtensor_ops.ops, "forward": dict(forward.counts()),
            "backward": dict(backward.counts()),
            "stepped": (tp.full_tensor(embedding) - reference.model.embed_tokens.weight).abs().max().item()}


def test_tied_llama_with_uneven_vocabulary(pool2):
    results = pool2.run(_tied_llama_on_rank)
    assert [r["local_rows"] for r in results] == [16001, 16000]
    for r in results:
        assert r["tied"] and r["placements"] == (Shard(0),), r
        # float32, the README's tolerances: logits 1e-5 absolute, gradients 1e-4 relative
        assert r["logits"] <= 1e-5 and r["loss"] <= 1e-5 and r["worst_grad_rel"] <= 1e-4, r
        assert r["stepped"] <= 1e-5, r
        # no DTensor operator anywhere in the forward of a 2-layer llama
        assert r["dtensor_ops_in_forward"] == [], r
        assert r["forward"] == {"all_reduce": 5, "all_gather": 1} and r["backward"] == {"all_reduce": 5}, r
