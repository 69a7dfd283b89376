"""Checkpoints: load a safetensors checkpoint straight into shards, and save a sharded model back.

Every rank reads only its own rows; the sharded model's logits match the unsharded model loaded
by transformers (max abs diff <= 1e-5); the checkpoint tp.save_pretrained writes loads in plain
transformers and equals the original tensors bit for bit; a bad checkpoint is one clear error.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import tp
import tp.testing.models

CASES = {
    "llama": ("llama", {}),
    "llama_kv2": ("llama", {"num_key_value_heads": 2}),  # kv heads replicated at tp=4
    "phi3_gqa": ("phi3", {"num_key_value_heads": 2}),     # fused qkv of unequal parts
    "yuan": ("yuan", {}),                                 # v/o in two head halves
    "gpt2": ("gpt2", {}),                                 # Conv1D, tied embeddings
    "mamba": ("mamba", {}),                               # a mixer style's layouts: [x | gate], channels
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    for name, (family, overrides) in CASES.items():
        # small shards: an indexed multi-file checkpoint
        tp.testing.models.tiny_model(family, **overrides).save_pretrained(root / name, max_shard_size="100KB")
    return root


def _load_and_compare(directory: str, saved: str) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = tp.from_pretrained(directory, mesh)
    reference = AutoModelForCausalLM.from_pretrained(directory).eval()
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    diff = (tp.full_tensor(model(input_ids=ids).logits) - reference(input_ids=ids).logits).abs().max().item()
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
    tp.save_pretrained(model, saved)
    return {"diff": diff, "local": local, "total": sum(p.numel() for p in reference.parameters())}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("pool_name", ["pool2", "pool4"])
def test_load_into_shards_and_save_back(case, pool_name, checkpoints, tmp_path, request):
    from transformers import AutoModelForCausalLM

    pool = request.getfixturevalue(pool_name)
    results = pool.run(_load_and_compare, str(checkpoints / case), str(tmp_path / "saved"))
    for r in results:
        assert r["diff"] <= 1e-5, r
        assert r["local"] < r["total"], r  # no rank holds the whole model
    original = dict(AutoModelForCausalLM.from_pretrained(checkpoints / case).named_parameters())
    saved = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "saved").named_parameters())
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[n], original[n]) for n in original)


def _load_error(directory: str) -> tuple[str, str, bool]:
    """Load on every rank; the error comes back as values, with whether the model could still run."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from tp.checkpoint.safetensors import parameters_on_meta

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    config = tp.testing.models.family_config("llama")
    from transformers import AutoModelForCausalLM

    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config)
    tp.apply(model, mesh)
    try:
        tp.load(model, directory)
    except tp.CheckpointError as e:
        try:  # parameters still on the meta device: no real result can come out
            runs = model(input_ids=torch.tensor([[3, 4, 5]])).logits.device.type != "meta"
        except Exception:  # noqa: BLE001 - any failure shows the model cannot run half-loaded
            runs = False
        return type(e).__name__, str(e), runs
    return "no error", "", True


def _broken(checkpoints, tmp_path, how: str):
    """A copy of the llama checkpoint broken in one way."""
    import shutil

    target = tmp_path / how
    shutil.copytree(checkpoints / "llama", target)
    index = json.loads((target / "model.safetensors.index.json").read_text())
    name = "model.layers.1.self_attn.k_proj.weight"
    path = target / index["weight_map"][name]
    tensors = load_file(path)
    if how == "missing":
        del tensors[name]
        del index["weight_map"][name]
        (target / "model.safetensors.index.json").write_text(json.dumps(index))
    elif how == "shape":
        tensors[name] = tensors[name][:, :32].contiguous()
    elif how == "dtype":
        tensors[name] = torch.ones(tensors[name].shape, dtype=torch.int32)
    save_file(tensors, path, metadata={"format": "pt"})
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return target, name, path.name


@pytest.mark.parametrize("how, words", [
    ("missing", ["lacks 1 tensor", "k_proj.weight"]),
    ("shape", ["has shape [32, 32]", "model's is [32, 64]"]),
    ("dtype", ["torch.int32", "cannot take"]),
    ("truncated", ["truncated"]),
])
def test_bad_checkpoint_is_one_clear_error(how, words, checkpoints, tmp_path, pool2):
    target, name, file = _broken(checkpoints, tmp_path, how)
    for kind, message, runs in pool2.run(_load_error, str(target)):
        assert kind == "CheckpointError", message
        assert all(w in message for w in words), message
        if how in ("shape", "dtype"):
            assert name in message and file in message, message
        if how == "truncated":  # a truncated file cannot be opened: the error names it and a tensor it holds
            assert file in message and "it holds model." in message, message
        assert not runs  # never a half-loaded model that runs


def test_no_checkpoint_in_the_directory(tmp_path):
    with pytest.raises(tp.CheckpointError, match="no model.safetensors"):
        tp.checkpoint.safetensors.checkpoint_files(tmp_path)


def test_progress_line_on_rank_zero_only_when_asked_or_on_a_terminal(capsys):
    from tp.checkpoint.safetensors import progress_reporter

    update = progress_reporter(True)
    update(1, 2, "a.weight")
    update(2, 2, "b.weight")
    err = capsys.readouterr().err
    assert "tp: loading 1/2 tensors (a.weight)" in err and err.endswith("\n")
    progress_reporter(False)(1, 2, "a.weight")
    progress_reporter(None)(1, 2, "a.weight")  # stderr is not a terminal under pytest
    assert capsys.readouterr().err == ""
