"""StableLM with ``qk_layernorm`` (StableLM 2 12B): its per-head q/k LayerNorm lists run on each
rank's own heads (``per_head_norms``) and match the unsharded model, with kv heads split and
replicated by need, and its checkpoints round-trip bit for bit.

Every norm gets its own random weight and bias here: with the initial weights (ones, zeros) all
norms are alike, and a rank pairing its heads with other heads' norms would go unnoticed."""

from functools import partial

import pytest
import torch

import tp
import tp.testing.models

# (use_parallel_residual, kv heads, TP size); the tiny stablelm has 8 query heads
CASES = {
    "sequential-kv4-tp2": (False, 4, 2),
    "parallel-kv4-tp2": (True, 4, 2),
    "sequential-kv4-tp4": (False, 4, 4),
    "parallel-kv2-tp4": (True, 2, 4),  # 2 kv heads over 4 ranks: ranks 0-1 hold kv head 0, 2-3 kv head 1
}


def stablelm(parallel_residual: bool = False, kv: int = 4, seed: int = 0):
    model = tp.testing.models.tiny_model("stablelm", qk_layernorm=True, use_parallel_residual=parallel_residual,
                                         num_key_value_heads=kv, seed=seed)
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (*layer.self_attn.q_layernorm.norms, *layer.self_attn.k_layernorm.norms):
                norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=gen))
                if norm.bias is not None:
                    norm.bias.copy_(0.5 * torch.randn(norm.bias.shape, generator=gen))
    return model


def test_distinct_norms_matter():
    """Control: the same model with each list's norms in another order gives other logits, so
    a rank that paired its heads with the wrong norms would fail the comparison below."""
    model = stablelm().eval()
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = model(input_ids=ids).logits
    for layer in model.model.layers:
        for per_head in (layer.self_attn.q_layernorm, layer.self_attn.k_layernorm):
            per_head.norms = torch.nn.ModuleList(list(per_head.norms)[::-1])
    assert (model(input_ids=ids).logits - logits).abs().max().item() > 1e-2


@pytest.mark.parametrize("case", sorted(CASES))
def test_per_head_norms_match_the_unsharded_model(case, request):
    parallel_residual, kv, size = CASES[case]
    result = tp.verify(model_factory=partial(stablelm, parallel_residual, kv), tp=size,
                       pool=request.getfixturevalue(f"pool{size}"))
    assert result.family == "stablelm", result.family
    assert result.logits_max_abs <= 1e-5, result.table()
    assert result.worst_grad_rel <= 1e-4, result.table()
    assert result.gathered_exact, result.gathered_mismatch
    # 2 all-reduces per layer in the backward for the q and k norm lists
    assert result.collectives_ok, result.table()


def _round_trip(directory: str, saved: str, kv: int) -> dict:
    """Load into shards, compare with the unsharded model, gather, train one step's gradients, save."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    model = tp.from_pretrained(directory, init_device_mesh("cpu", (dist.get_world_size(),)))
    reference = AutoModelForCausalLM.from_pretrained(directory).eval()
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    diff = (out.logits - reference(input_ids=ids).logits).abs().max().item()
    out.loss.backward()
    norms = {n: p for n, p in model.named_parameters() if "layernorm.norms" in n}
    # replicated parameters: every rank must hold the same gradient, or the replicas drift apart
    grads = torch.cat([p.grad.to_local().reshape(-1) for p in norms.values()])
    every = [torch.empty_like(grads) for _ in range(dist.get_world_size())]
    dist.all_gather(every, grads)
    full = tp.full_state_dict(model)
    tp.save_pretrained(model, saved)
    return {"diff": diff, "all_dtensors": all(isinstance(p, DTensor) for p in model.parameters()),
            "norm_params": len(norms), "same_grads": all(torch.equal(g, grads) for g in every),
            "nonzero_grads": bool(grads.abs().sum() > 0),
            "differing": [n for n, t in reference.state_dict().items() if not torch.equal(full[n], t)]}


@pytest.mark.parametrize("kv, pool_name", [(4, "pool2"), (2, "pool4")])
def test_checkpoint_round_trip_is_bit_exact(kv, pool_name, tmp_path, request):
    from transformers import AutoModelForCausalLM

    stablelm(kv=kv).save_pretrained(tmp_path / "original")
    results = request.getfixturevalue(pool_name).run(_round_trip, str(tmp_path / "original"),
                                                     str(tmp_path / "saved"), kv)
    for r in results:
        assert r["diff"] <= 1e-5 and r["differing"] == [], r
        assert r["all_dtensors"] and r["same_grads"] and r["nonzero_grads"], r
        assert r["norm_params"] == 2 * (8 + kv), r  # 2 layers of q and kv norms (a weight, no bias)
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "original").state_dict()
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").state_dict()
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[n], original[n]) for n in original)


def test_heads_that_do_not_split_are_refused():
    from tp.styles.per_head_norms import PerHeadNorms

    model = stablelm(kv=2)
    style = PerHeadNorms(heads="kv")

    class ThreeRanks:  # the style refuses before it reads anything else of the mesh
        def size(self):
            return 3

    with pytest.raises(tp.SizeError, match="2 kv heads of 1 rows do not divide by tp=3 nor does tp divide"):
        style._apply(model.model.layers[0].self_attn.k_layernorm, ThreeRanks())
