"""Intermediate sizes that do not divide by the TP size are sharded unevenly, as torch.chunk splits
them (rank 0 the larger shard), and exactly: logits, gradients, gathered parameters, checkpoints
(safetensors and DCP, resharded TP=2 -> TP=4) against the unsharded model. Fused parts and heads
must still divide, and are refused with the reason."""

import json

import pytest
import torch

import tp
import tp.checks.sizes
import tp.testing.models
from tp.sharding.layouts import Layout, Part

# (family, overrides, TP size): plain nn.Linear MLPs (local linears) and GPT-2's Conv1D (layouts)
CASES = {
    "llama-201-tp2": ("llama", {"intermediate_size": 201}, 2),
    "llama-202-tp4": ("llama", {"intermediate_size": 202}, 4),    # 51, 51, 51, 49
    "llama-203-tp4": ("llama", {"intermediate_size": 203}, 4),    # 51, 51, 51, 50
    "llama-5-tp4": ("llama", {"intermediate_size": 5}, 4),        # 2, 2, 1, 0: the last rank holds none
    "gpt2-201-tp2": ("gpt2", {"n_inner": 201}, 2),
}


def test_one_part_of_rows_splits_as_torch_chunk():
    for rows, ranks in ((201, 2), (202, 4), (203, 4), (5, 4), (128, 4)):
        layout = Layout((Part(rows, 1, uneven=True),))
        chunks = torch.arange(rows).chunk(ranks)
        for rank in range(ranks):
            want = chunks[rank].tolist() if rank < len(chunks) else []
            assert layout.rows(ranks, rank) == want, (rows, ranks, rank)
        # a layout's module may be a convolution, which cannot run a rank with no channels
        assert layout.problems(ranks) == ([] if len(chunks) == ranks else
                                          [f"part: {rows} units split as torch.chunk splits them (2 per rank) "
                                           f"leave rank {ranks - 1} none at tp={ranks}"])


def test_fused_parts_and_heads_must_still_divide():
    two_parts = Layout((Part(201, 1, name="gate", unit="rows", uneven=True),
                        Part(201, 1, name="up", unit="rows", uneven=True)))
    (problem,) = two_parts.problems(2)
    assert "201 rows do not divide by tp=2" in problem and "fused weight must split evenly" in problem
    heads = Layout((Part(6, 8, name="q heads", unit="heads"),))
    assert heads.problems(4) == ["q heads: 6 heads of 8 rows do not divide by tp=4"]


def test_packed_gate_up_is_refused_with_the_reason():
    # phi3's gate_up_proj packs [gate; up]: each rank must hold the same share of both halves
    model = tp.testing.models.tiny_model("phi3", intermediate_size=201)
    lines, working = tp.checks.sizes.problems(model, tp.resolve(model, 2), 2)
    assert lines == ["model.layers.*.mlp.gate_up_proj.weight: each of 2 equal parts: 201 rows do not divide by "
                     "tp=2, and the parts of a fused weight must split evenly (each rank holds the same share of "
                     "every part)"]
    assert 2 not in working and 1 in working


def test_heads_are_not_split_as_rows():
    # 6 query heads of 8 features: 48 features would split 12/12/12/12 at TP=4, cutting heads apart.
    # Plain q/k/v/o linears split them balanced instead (tests/test_balanced_heads.py), with or
    # without sequence parallelism; the intermediate features split as torch.chunk does
    model = tp.testing.models.tiny_model("llama", num_attention_heads=6, num_key_value_heads=3, hidden_size=48,
                                         head_dim=8, intermediate_size=201)
    assert tp.checks.sizes.problems(model, tp.resolve(model, 4), 4)[0] == []
    assert tp.checks.sizes.problems(model, tp.resolve(model, 4, sequence_parallel=True), 4)[0] == []
    # GQA kv heads' norm rows (Cohere's k_norm, 3 kv heads at TP=4) split as torch.chunk splits
    # them, which matches no split of the kv heads: refused, naming them
    cohere = tp.testing.models.tiny_model("cohere", use_qk_norm=True, num_attention_heads=6, num_key_value_heads=3,
                                          hidden_size=48, head_dim=8)
    lines, _ = tp.checks.sizes.problems(cohere, tp.resolve(cohere, 4), 4)
    assert lines == ["model.layers.*.self_attn.k_norm: weight.shape[0] = 3 does not divide by tp=4"], lines


@pytest.mark.parametrize("case", sorted(CASES))
def test_uneven_intermediate_matches_the_unsharded_model(case, request):
    family, overrides, size = CASES[case]
    result = tp.verify(family, tp=size, config_overrides=overrides, pool=request.getfixturevalue(f"pool{size}"))
    assert result.logits_max_abs <= 1e-5, result.table()
    assert result.worst_grad_rel <= 1e-4, result.table()
    assert result.gathered_exact, result.gathered_mismatch
    assert result.collectives_ok, result.table()


@pytest.mark.parametrize("case", ["llama-201-tp2", "llama-203-tp4", "llama-5-tp4", "gpt2-201-tp2"])
def test_uneven_intermediate_under_sequence_parallelism(case, request):
    """The row-parallel down_proj reads its local features as torch.chunk split them (at 5 over 4
    ranks the last one holds none, and computes a zero partial sum) and reduce-scatters its output
    along the sequence."""
    family, overrides, size = CASES[case]
    result = tp.verify(family, tp=size, config_overrides=overrides, pool=request.getfixturevalue(f"pool{size}"),
                       sequence_parallel=True)
    assert result.ok, result.table()
    assert result.activation_bytes_per_rank * size == result.activation_bytes_unsharded, result.table()


def _conv_pair_on_rank(middle: int) -> dict:
    """A column-parallel Conv2d (3 -> middle channels) into a row-parallel one (middle -> 5)."""
    import copy

    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from tp.styles.layout import ColwiseLayout, RowwiseLayout

    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, middle, 3, padding=1), nn.GELU(), nn.Conv2d(middle, 5, 3, padding=1))
    model = parallelize_module(copy.deepcopy(ref), init_device_mesh("cpu", (dist.get_world_size(),)),
                               {"0": ColwiseLayout(), "2": RowwiseLayout()})
    x = torch.randn(2, 3, 9, 9)
    ref(x).square().sum().backward()
    out = model(x)
    out.square().sum().backward()
    grads = {n: (tp.full_tensor(p.grad) - r.grad).abs().max().item() / r.grad.abs().max().item()
             for (n, p), r in zip(model.named_parameters(), ref.parameters(), strict=True)}
    return {"diff": (out - ref(x)).abs().max().item(), "grad_rel": max(grads.values()),
            "exact": all(torch.equal(tp.full_tensor(p), r) for p, r in zip(model.parameters(), ref.parameters())),
            "channels": model[0].weight.to_local().shape[0]}


@pytest.mark.parametrize("middle, pool_name", [(7, "pool2"), (7, "pool4")])
def test_uneven_convolution_channels(middle, pool_name, request):
    results = request.getfixturevalue(pool_name).run(_conv_pair_on_rank, middle)
    assert [r["channels"] for r in results] == [len(c) for c in torch.arange(middle).chunk(len(results))]
    for r in results:
        assert r["diff"] <= 1e-5 and r["grad_rel"] <= 1e-4 and r["exact"], r


def _checkpoint_round_trip(directory: str, saved: str) -> dict:
    """Load a transformers checkpoint into shards, compare with the unsharded model, save it back."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM

    model = tp.from_pretrained(directory, init_device_mesh("cpu", (dist.get_world_size(),)))
    reference = AutoModelForCausalLM.from_pretrained(directory).eval()
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    diff = (model(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max().item()
    full = tp.full_state_dict(model)
    differing = [n for n, t in reference.state_dict().items() if not torch.equal(full[n], t)]
    down = model.model.layers[0].mlp.down_proj.weight
    tp.save_pretrained(model, saved)
    return {"diff": diff, "differing": differing, "local_down": tuple(down.to_local().shape)}


@pytest.mark.parametrize("size, pool_name", [(201, "pool2"), (203, "pool4")])
def test_checkpoint_round_trip_is_bit_exact(size, pool_name, tmp_path, request):
    from transformers import AutoModelForCausalLM

    tp.testing.models.tiny_model("llama", intermediate_size=size).save_pretrained(tmp_path / "original")
    results = request.getfixturevalue(pool_name).run(_checkpoint_round_trip, str(tmp_path / "original"),
                                                     str(tmp_path / "saved"))
    ranks = len(results)
    chunks = [len(c) for c in torch.arange(size).chunk(ranks)]
    assert [r["local_down"] for r in results] == [(64, c) for c in chunks]  # rank 0 the larger shard
    for r in results:
        assert r["diff"] <= 1e-5 and r["differing"] == [], r
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "original").state_dict()
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").state_dict()
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[n], original[n]) for n in original)


def _dcp_save(overrides: dict, path: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    model = tp.testing.models.tiny_model("llama", **overrides)
    tp.apply(model, init_device_mesh("cpu", (dist.get_world_size(),)))
    tp.dcp.save(model, path)


def _dcp_load(overrides: dict, path: str) -> list[str]:
    """Names of the tensors that differ from the original after loading into other weights."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    original = tp.testing.models.tiny_model("llama", **overrides).state_dict()
    model = tp.testing.models.tiny_model("llama", seed=123, **overrides)
    tp.apply(model, init_device_mesh("cpu", (dist.get_world_size(),)))
    tp.dcp.load(model, path)
    full = tp.full_state_dict(model)
    return [name for name, tensor in original.items() if not torch.equal(full[name], tensor)]


def test_dcp_saved_at_tp2_loads_at_tp4(pool2, pool4, tmp_path):
    overrides = {"intermediate_size": 201}  # 101 + 100 at TP=2, 51 + 50 + 50 + 50 at TP=4
    pool2.run(_dcp_save, overrides, str(tmp_path / "ckpt"))
    for differing in pool4.run(_dcp_load, overrides, str(tmp_path / "ckpt")):
        assert differing == [], differing


def test_plan_lists_each_ranks_size(monkeypatch, capsys):
    from tp import cli

    monkeypatch.setattr(tp.testing.models, "family_config", _with_intermediate(tp.testing.models.family_config, 203))
    assert cli.main(["plan", "llama", "--tiny", "--tp", "4"]) in (0, None)
    text = capsys.readouterr().out
    assert "weight [64, 203] -> [64, 51] (dim 1 per rank: 51 x3, 50)" in text
    assert "weight [203, 64] -> [51, 64] (dim 0 per rank: 51 x3, 50)" in text
    assert cli.main(["plan", "llama", "--tiny", "--tp", "4", "--json"]) in (0, None)
    plan = json.loads(capsys.readouterr().out)
    down = next(m for m in plan["modules"] if m["module"].endswith("mlp.down_proj"))
    assert down["parameters"] == [{"name": "weight", "shape": [64, 203], "per_rank": [64, 51],
                                   "uneven": {"dim": 1, "sizes": [51, 51, 51, 50]}, "computes": None}]
    norm = next(m for m in plan["modules"] if m["module"] == "model.norm")
    assert norm["parameters"][0]["uneven"] is None


def _with_intermediate(family_config, size):
    def config(name, **kwargs):
        return family_config(name, **{**kwargs, "intermediate_size": size})

    return config
