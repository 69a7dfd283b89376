"""MoE checkpoints as transformers writes them load straight into shards, and save back as it writes them.

transformers' ``save_pretrained`` writes one tensor per expert for mixtral, qwen2_moe, qwen3_moe,
olmoe and deepseek_v3 (its conversion rules reverted), and GPT-OSS's packed experts as they are.
Each checkpoint loads at TP=2 and TP=4 with logits within 1e-5 of transformers' own load of the
same directory and with every parameter bit for bit transformers'; ``tp.save_pretrained`` then
writes exactly the tensors, under exactly the names, of the original files.
"""

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tp
import tp.testing.models

EXPERTS = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}
CASES = {
    # family, config overrides, save_pretrained keyword arguments
    "mixtral": ("mixtral", {}, {}),
    "mixtral_packed": ("mixtral", {}, {"save_original_format": False}),  # packed names, which transformers loads too
    "mixtral_bf16": ("mixtral", {}, {}),  # saved in bfloat16: loads as bfloat16
    "qwen2_moe": ("qwen2_moe", {**EXPERTS, "num_experts": 4, "shared_expert_intermediate_size": 64}, {}),
    "qwen3_moe": ("qwen3_moe", {**EXPERTS, "num_experts": 4}, {}),
    "olmoe": ("olmoe", {"num_experts_per_tok": 2, "num_experts": 4, "intermediate_size": 32}, {}),
    "deepseek_v3": ("deepseek_v3", {**EXPERTS, "n_routed_experts": 4, "n_group": 1, "topk_group": 1,
                                    "first_k_dense_replace": 1,  # layer 0 dense, layer 1 MoE
                                    # multi-head latent attention at tiny size: as many kv heads as heads
                                    "num_key_value_heads": 8, "q_lora_rank": 32, "kv_lora_rank": 16, "head_dim": 8,
                                    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8}, {}),
    "gpt_oss": ("gpt_oss", {"num_experts_per_tok": 2, "num_local_experts": 4, "intermediate_size": 32}, {}),
}
IDS = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(0))


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return {name: t for file in sorted(directory.glob("*.safetensors")) for name, t in load_file(file).items()}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    for name, (family, overrides, save) in CASES.items():
        model = tp.testing.models.tiny_model(family, **overrides)
        if name.endswith("_bf16"):
            model = model.to(torch.bfloat16)
        model.save_pretrained(root / name, max_shard_size="200KB", **save)  # indexed, several files
    return root


def _load_all(root: str, out: str, cases: list[str]) -> dict:
    """Each case loaded into shards: rank 0's logits and full parameters; each rank's local share."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    found = {}
    for name in cases:
        model = tp.from_pretrained(f"{root}/{name}", mesh)
        with torch.no_grad():
            logits = tp.full_tensor(model(input_ids=IDS).logits)
        params = tp.full_parameters(model)
        # gate_up_proj is stored as two parts (gate, up) when sharded: each rank holds its rows of each
        experts = [p for n, p in model.named_parameters() if re.search(r"experts\.gate_up_proj(_part0)?$", n)]
        local = experts[0].to_local() if hasattr(experts[0], "to_local") else experts[0]
        tp.save_pretrained(model, f"{out}/{name}")
        found[name] = {"logits": logits, "params": params, "experts_local": tuple(local.shape),
                       "experts_global": tuple(experts[0].shape)}
    return found


# TP=4 runs two families by default (one per attention kind: GQA and latent), the rest with --slow
AT_TP4 = ["mixtral", "deepseek_v3"]


def _loaded(pool, checkpoints, out, cases):
    return pool.run(_load_all, str(checkpoints), str(out), cases), out


@pytest.fixture(scope="module")
def loaded_tp2(pool2, checkpoints, tmp_path_factory):
    return _loaded(pool2, checkpoints, tmp_path_factory.mktemp("saved2"), sorted(CASES))


@pytest.fixture(scope="module")
def loaded_tp4(pool4, checkpoints, tmp_path_factory):
    return _loaded(pool4, checkpoints, tmp_path_factory.mktemp("saved4"), AT_TP4)


@pytest.fixture(scope="module")
def loaded_tp4_rest(pool4, checkpoints, tmp_path_factory):
    return _loaded(pool4, checkpoints, tmp_path_factory.mktemp("saved4rest"), sorted(set(CASES) - set(AT_TP4)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_moe_checkpoint_at_tp2_loads_into_shards_and_saves_as_transformers_writes_it(case, checkpoints, loaded_tp2):
    _check_loaded_and_saved(case, checkpoints, *loaded_tp2)


@pytest.mark.parametrize("case", AT_TP4)
def test_moe_checkpoint_at_tp4_loads_into_shards_and_saves_as_transformers_writes_it(case, checkpoints, loaded_tp4):
    _check_loaded_and_saved(case, checkpoints, *loaded_tp4)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(set(CASES) - set(AT_TP4)))
def test_every_moe_checkpoint_at_tp4(case, checkpoints, loaded_tp4_rest):
    _check_loaded_and_saved(case, checkpoints, *loaded_tp4_rest)


def _check_loaded_and_saved(case: str, checkpoints: Path, results: list[dict], saved: Path) -> None:
    """Logits and every parameter as transformers loads the checkpoint; each rank holds only its
    rows of the experts; tp.save_pretrained wrote the original files' names and tensors bit for bit."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(checkpoints / case).eval()
    with torch.no_grad():
        expected = reference(input_ids=IDS).logits
    params = dict(reference.named_parameters())
    # float32: 1e-5; bfloat16 sums in another order on each rank: a few units in the last place (2^-8 relative)
    tolerance = 1e-5 if expected.dtype == torch.float32 else 4 * 2**-8 * expected.abs().max().item()
    for rank, found in enumerate(results):
        got = found[case]
        assert got["logits"].dtype == expected.dtype
        assert (got["logits"].float() - expected.float()).abs().max().item() <= tolerance, (case, rank)
        assert got["params"].keys() == params.keys()
        for name, value in got["params"].items():
            assert value.dtype == params[name].dtype and torch.equal(value, params[name]), (case, rank, name)
    local, whole = results[0][case]["experts_local"], results[0][case]["experts_global"]
    if CASES[case][0] != "gpt_oss":  # GPT-OSS's experts (with biases) stay whole: the experts style does not take them
        assert local[1] == whole[1] // len(results), (local, whole)  # each rank holds only its rows of each expert
    original, written = _weights(checkpoints / case), _weights(saved / case)
    assert written.keys() == original.keys()  # per-expert names where transformers writes them, else packed
    assert all(written[n].dtype == original[n].dtype and torch.equal(written[n], original[n]) for n in original)


def test_transformers_writes_per_expert_names_for_these_families(checkpoints):
    """What the round trip above must reproduce: the layouts transformers 5 writes."""
    names = {case: set(_weights(checkpoints / case)) for case in CASES}
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in names["mixtral"]
    assert "model.layers.0.mlp.experts.gate_up_proj" in names["mixtral_packed"]
    for case in ("qwen2_moe", "qwen3_moe", "olmoe"):
        assert "model.layers.1.mlp.experts.3.gate_proj.weight" in names[case], case
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in names["deepseek_v3"]
    assert "model.layers.1.mlp.experts.gate_up_proj" in names["gpt_oss"]


def test_converter_that_does_not_commute_with_slicing_reads_whole_tensors_then_slices():
    """A converter whose result rows mix the checkpoint rows (an interleave) still gives exact rows."""
    from transformers.core_model_loading import (
        Interleave,
        MergeModulelist,
        WeightConverter,
    )

    from tp.checkpoint.conversion import Source, read_converted

    stored = {f"e.{i}.w": torch.arange(24.0).reshape(6, 4) + 100 * i for i in range(3)}

    class File:
        path = Path("model.safetensors")

        def shape(self, key):
            return tuple(stored[key].shape)

        def read(self, key, dim, rows):
            self.reads.append((key, dim, rows))
            return stored[key] if dim is None else stored[key].index_select(dim, torch.tensor(rows))

    converter = WeightConverter(".e.*.w", ".packed", operations=[MergeModulelist(dim=0), Interleave(dim=1)])
    f = File()
    for rows, whole_reads in (([0, 1, 2], True), ([3, 4, 5], True)):
        f.reads = []
        source = Source(tuple(stored), (".e.*.w",) * 3, converter)
        got = read_converted(lambda key: f, "m.packed", source, None, torch.float32, (3, 6, 4), 1, rows)
        full = torch.stack(list(stored.values()))
        full = full.reshape(3, 3, 2, 4).transpose(1, 2).reshape(3, 6, 4)
        assert torch.equal(got, full[:, rows]), rows
        assert all(dim is None for _, dim, _ in f.reads) == whole_reads

    # stacking alone commutes: only the rank's rows are read
    f.reads = []
    stacking = WeightConverter(".e.*.w", ".packed", operations=[MergeModulelist(dim=0)])
    got = read_converted(lambda key: f, "m.packed", Source(tuple(stored), (".e.*.w",) * 3, stacking), None,
                         torch.float32, (3, 6, 4), 1, [2, 3])
    assert torch.equal(got, torch.stack(list(stored.values()))[:, [2, 3]])
    assert f.reads == [(key, 0, [2, 3]) for key in stored]
