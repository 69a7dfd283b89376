"""Validated files: every safetensors header and index is checked as the safetensors library
checks it before a byte of tensor data is read; each corruption is one tp.CheckpointError that
names the file and the tensor. Tensors the model lacks are an error (strict=False: a warning).
Single-process: tp.load on an unsharded model reads the same files the same way.
"""

import json
import shutil
import struct

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import tp
import tp.testing.models

TENSOR = "model.layers.0.self_attn.k_proj.weight"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 1-layer llama as a single file, the same as indexed shards, and a 2-layer one."""
    root = tmp_path_factory.mktemp("files")
    tp.testing.models.tiny_model("llama", num_hidden_layers=1).save_pretrained(root / "single")
    tp.testing.models.tiny_model("llama", num_hidden_layers=1).save_pretrained(root / "indexed",
                                                                               max_shard_size="100KB")
    tp.testing.models.tiny_model("llama", num_hidden_layers=2).save_pretrained(root / "two_layers")
    return root


def _model(directory):
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))


def _split(path):
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), data[8 + length:]


def _write(path, header, body: bytes, length: int | None = None):
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded) if length is None else length) + encoded + body)


def _corrupt(header: dict, how: str):
    entry = header[TENSOR]
    begin, end = entry["data_offsets"]
    if how == "bf16 for f32 data":
        entry["dtype"] = "BF16"
    elif how == "short offsets":
        entry["data_offsets"] = [begin, end - 4]
    elif how == "negative offsets":
        entry["data_offsets"] = [-4, end - begin - 4]
    elif how == "no shape":
        del entry["shape"]
    elif how == "unknown dtype":
        entry["dtype"] = "F7"
    elif how == "overlapping":  # another tensor's bytes, same size
        other = next(e for n, e in header.items() if n != TENSOR and n != "__metadata__" and e["shape"] == entry["shape"]
                     and e["data_offsets"] != entry["data_offsets"])
        entry["data_offsets"] = list(other["data_offsets"])
    elif how == "header is a list":
        return [header]
    return header


@pytest.mark.parametrize("how, words", [
    ("bf16 for f32 data", ["of BF16 takes", "span"]),
    ("short offsets", ["span", "takes"]),
    ("negative offsets", ["negative"]),
    ("no shape", ["no shape"]),
    ("unknown dtype", ["dtype 'F7' is not one tp reads"]),
    ("overlapping", ["overlap"]),
])
def test_each_bad_entry_is_one_error_naming_the_file_and_the_tensor(how, words, saved, tmp_path):
    target = shutil.copytree(saved / "single", tmp_path / "ckpt")
    header, body = _split(target / "model.safetensors")
    _write(target / "model.safetensors", _corrupt(header, how), body)
    with pytest.raises(tp.CheckpointError) as caught:
        tp.load(_model(target), target)
    message = str(caught.value)
    assert "model.safetensors" in message and TENSOR in message, message
    assert all(w in message for w in words), message


@pytest.mark.parametrize("how, words", [
    ("header is a list", ["its header is a JSON list, not an object"]),
    ("huge header length", ["header length 1099511627776 is larger than safetensors allows"]),
    ("header length past the end", ["is larger than the file"]),
    ("header not JSON", ["its header is not JSON"]),
    ("empty file", ["too short for a safetensors file"]),
])
def test_a_bad_header_is_one_error_naming_the_file(how, words, saved, tmp_path):
    target = shutil.copytree(saved / "single", tmp_path / "ckpt")
    path = target / "model.safetensors"
    header, body = _split(path)
    if how == "header is a list":
        _write(path, _corrupt(header, how), body)
    elif how == "huge header length":
        _write(path, header, body, length=2 ** 40)
    elif how == "header length past the end":
        _write(path, header, body, length=len(json.dumps(header)) + len(body) + 1)
    elif how == "header not JSON":
        path.write_bytes(struct.pack("<Q", 4) + b"{{{{" + body)
    elif how == "empty file":
        path.write_bytes(b"")
    with pytest.raises(tp.CheckpointError) as caught:
        tp.load(_model(target), target)
    message = str(caught.value)
    assert str(path) in message and all(w in message for w in words), message


@pytest.mark.parametrize("how, words", [
    ("bad JSON", ["is not valid JSON", "line 1"]),
    ("no weight_map", ['has no "weight_map" object']),
    ("a path, not a file name", ["not a file name in the checkpoint's directory"]),
    ("shard file missing", ["cannot read", "No such file", "it holds model."]),
])
def test_a_bad_index_is_one_error_naming_it(how, words, saved, tmp_path):
    target = shutil.copytree(saved / "indexed", tmp_path / "ckpt")
    index = target / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    if how == "bad JSON":
        index.write_text(index.read_text()[:-10])
    elif how == "no weight_map":
        index.write_text(json.dumps({"metadata": content["metadata"]}))
    elif how == "a path, not a file name":
        content["weight_map"][TENSOR] = "../elsewhere.safetensors"
        index.write_text(json.dumps(content))
    elif how == "shard file missing":
        (target / content["weight_map"][TENSOR]).unlink()
    with pytest.raises(tp.CheckpointError) as caught:
        tp.load(_model(target), target)
    message = str(caught.value)
    named = index.name if how != "shard file missing" else content["weight_map"][TENSOR]
    assert named in message and all(w in message for w in words), message


def test_tensors_the_model_lacks_are_an_error_or_with_strict_false_a_warning(saved, tmp_path):
    target = shutil.copytree(saved / "two_layers", tmp_path / "ckpt")
    config = json.loads((target / "config.json").read_text())
    config["num_hidden_layers"] = 1  # the config says 1 layer, the file holds 2
    (target / "config.json").write_text(json.dumps(config))
    model = _model(target)
    with pytest.raises(tp.CheckpointError, match=r"holds 9 tensor\(s\) the model lacks: model\.layers\.1\..* "
                                                 r"\(in model\.safetensors\).*Pass strict=False"):
        tp.load(model, target)
    with pytest.warns(UserWarning, match=r"the model lacks: model\.layers\.1\..*ignored them \(strict=False\)"):
        tp.load(model, target, strict=False)
    two_layers = dict(AutoModelForCausalLM.from_pretrained(saved / "two_layers").named_parameters())
    assert all(torch.equal(p, two_layers[n]) for n, p in model.named_parameters())


def test_a_stale_single_file_beside_an_index_is_refused(saved, tmp_path):
    """transformers would load the single file, an index-first reader the shards: refuse, never guess."""
    target = shutil.copytree(saved / "indexed", tmp_path / "ckpt")
    shutil.copy(saved / "single" / "model.safetensors", target)
    with pytest.raises(tp.CheckpointError, match="holds both model.safetensors and model.safetensors.index.json"):
        tp.load(_model(target), target)


def test_a_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(tp.CheckpointError, match=f"^no such directory: {missing}$"):
        tp.from_pretrained(missing, mesh=None)
    with pytest.raises(tp.CheckpointError, match=f"^no such directory: {missing}$"):
        tp.load(torch.nn.Linear(2, 2), missing)
