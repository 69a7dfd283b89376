"""FSDP2 over tensor parallelism on a 2-D (dp, tp) mesh of 4 CPU ranks trains like the unsharded model.

``tp.apply`` shards every model over ``mesh["tp"]``; then ``fully_shard`` shards each decoder
layer and the root over ``mesh["dp"]`` (torchtitan's order). Each dp rank trains on its own
micro-batch (both tp ranks of a dp group on the same one); the reference is the unsharded model
on the concatenated global batch, whose mean loss is the mean of the dp ranks' losses (equal
micro-batches) and whose gradient is FSDP's dp average. Both run the standard loop: foreach
AdamW and ``clip_grad_norm_`` over all parameters; after every step the losses and the gradient
norms agree, and at the end every parameter, gathered by ``tp.full_state_dict``.
"""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import tp
from tp.testing.models import tiny_model

DP, TP = 2, 2
STEPS, BATCH, SEQ, LR = 3, 2, 8, 1e-3
LOSS_RTOL, PARAM_ATOL = 1e-5, 1e-5
# AdamW's eps=1e-6, not 1e-8: tests/test_training.py says why (phi3's embedding rows whose gradient is
# about 1e-8 would move by rounding noise scaled by lr/eps, 4e-5 here, in any re-ordered computation)
EPS = 1e-6
MAX_NORM = 1.0  # below these runs' gradient norms (about 2.5): every step is clipped


def _batches(vocab: int) -> list[torch.Tensor]:
    """The global batch of every step; dp rank ``d`` trains on rows ``d*BATCH:(d+1)*BATCH``."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (DP * BATCH, SEQ), generator=gen) for _ in range(STEPS)]


def _blocks(model) -> list[torch.nn.Module]:
    """The decoder layers: Hugging Face models name their class in ``_no_split_modules``."""
    names = set(model._no_split_modules)
    return [m for m in model.modules() if type(m).__name__ in names]


def _train_fsdp_tp(family: str, overrides: dict):
    mesh = init_device_mesh("cpu", (DP, TP), mesh_dim_names=("dp", "tp"))
    model = tiny_model(family, **overrides)  # the same seed, so the same weights, on every rank
    tp.apply(model, mesh["tp"])
    for block in _blocks(model):
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, foreach=True)
    dp = mesh["dp"].get_local_rank()
    losses, norms = [], []
    for ids in _batches(model.config.vocab_size):
        mine = ids[dp * BATCH:(dp + 1) * BATCH]
        loss = model(input_ids=mine, labels=mine).loss
        loss.backward()
        norms.append(tp.full_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)).item())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    params = tp.full_state_dict(model)
    return losses, params if dist.get_rank() == 0 else None, norms


def _train_reference(family: str, overrides: dict):
    model = tiny_model(family, **overrides)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, foreach=True)
    losses, norms = [], []
    for ids in _batches(model.config.vocab_size):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {name: p.detach() for name, p in model.state_dict().items()}, model.config, norms


def _noise_rows(family: str, name: str, config) -> slice | None:
    """Rows whose gradient is zero up to rounding, so that AdamW moves them by rounding noise
    scaled by lr/eps (about 1e-5 after 3 steps, in both models): GPT-2's key bias, which
    softmax ignores."""
    if family == "gpt2" and name.endswith("attn.c_attn.bias"):
        return slice(config.n_embd, 2 * config.n_embd)
    return None


@pytest.mark.parametrize("family, overrides", [
    pytest.param("llama", {}, id="llama"),
    pytest.param("gpt2", {}, id="gpt2"),
    # fused qkv_proj with fewer kv than query heads (its rows in rank order) and packed gate_up_proj
    pytest.param("phi3", {}, id="phi3"),
    # kv heads replicated over tp (kv=1 < tp=2): their gradient sum is part of the graph, so it
    # survives fully_shard replacing the Parameters
    pytest.param("llama", {"num_key_value_heads": 1}, id="llama-kv1"),
    # kv groups interleaved with their query heads in query_key_value
    pytest.param("falcon", {}, id="falcon"),
    # multi-query fused query_key_value: its k and v parts stored whole (replicated), the q part sharded
    pytest.param("falcon", {"new_decoder_architecture": False}, id="falcon-mqa"),
    # localized filtering's convolutions sharded, v/o split in two head halves
    pytest.param("yuan", {}, id="yuan"),
])
def test_fsdp_tp_trains_like_unsharded(pool4, family, overrides):
    results = pool4.run(_train_fsdp_tp, family, overrides)
    ref_losses, ref_params, config, ref_norms = _train_reference(family, overrides)

    losses = [r[0] for r in results]  # ranks 0, 1: dp group 0; ranks 2, 3: dp group 1
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    assert losses[3] == pytest.approx(losses[2], rel=1e-6)
    for step, (ref, first, second) in enumerate(zip(ref_losses, losses[0], losses[2], strict=True)):
        ours = (first + second) / 2
        assert abs(ours - ref) <= LOSS_RTOL * abs(ref), f"step {step}: loss {ours:.8f}, unsharded {ref:.8f}"
    for norms in (r[2] for r in results):  # the norm of the dp-averaged gradient, on every rank
        assert min(ref_norms) > MAX_NORM
        for step, (ref, ours) in enumerate(zip(ref_norms, norms, strict=True)):
            assert abs(ours - ref) <= LOSS_RTOL * ref, f"step {step}: grad norm {ours:.8f}, unsharded {ref:.8f}"

    params = results[0][1]
    assert params.keys() == ref_params.keys()
    for name, ref in ref_params.items():
        assert params[name].shape == ref.shape, name
        diff = (params[name] - ref).abs()
        noise = _noise_rows(family, name, config)
        if noise is not None:
            assert diff[noise].max().item() <= 10 * PARAM_ATOL, f"{name}[{noise}]: {diff[noise].max().item():.2e}"
            diff[noise] = 0
        assert diff.max().item() <= PARAM_ATOL, f"{name}: max abs diff {diff.max().item():.2e}"
