"""Each bad input gets one clear error, raised before anything is sharded.

Rank functions are module-level (they are pickled to the worker processes) and return plain
data (the caught exception's type name and message) so that the shared pools stay healthy."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

import tp
import tp.checks.sizes
import tp.testing.models
from tp.styles import STYLES, StyleSpec


def _has_dtensor(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _local_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    from torch.distributed.tensor import DTensor

    return {n: tuple((p.to_local() if isinstance(p, DTensor) else p).shape) for n, p in model.named_parameters()}


def _outcome(fn) -> dict:
    try:
        value = fn()
    except Exception as e:  # returned, not raised, so the pool stays up
        return {"raised": True, "type": type(e).__name__, "message": str(e),
                "is_tp_error": isinstance(e, tp.TPError), "value": None}
    return {"raised": False, "type": None, "message": "", "is_tp_error": False, "value": value}


# ---------------------------------------------------------------------------------------------
# Rank functions (run on every rank of a pool)


# 6 query heads in 3 GQA groups, with Cohere's q/k LayerNorms: one weight row per head; the 3 kv heads'
# rows of k_norm must divide
COHERE_6_3 = dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=48, head_dim=8, intermediate_size=96,
                  use_qk_norm=True)


def _rank_apply_indivisible_heads() -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    model = tp.testing.models.tiny_model("cohere", **COHERE_6_3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    out = _outcome(lambda: tp.apply(model, mesh))
    out["sharded_after_error"] = _has_dtensor(model)
    out["unchanged"] = all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    return out


def _rank_apply_twice() -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    model = tp.testing.models.tiny_model("llama")
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    first = _outcome(lambda: tp.apply(model, mesh).family)
    shapes = _local_shapes(model)
    second = _outcome(lambda: tp.apply(model, mesh))
    # The failed second call left the first sharding as it was, and the model still runs.
    same = shapes == _local_shapes(model) and shapes["lm_head.weight"] == (128, 64)
    logits = model(input_ids=torch.tensor([[3, 4, 5]])).logits
    return {"first": first, "second": second, "same_shapes": same, "logits_shape": tuple(logits.shape)}


def _rank_apply_2d_mesh() -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    model = tp.testing.models.tiny_model("llama")
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    out = _outcome(lambda: tp.apply(model, mesh))
    out["sharded_after_error"] = _has_dtensor(model)
    # The hint in the message works: the 1-D sub-mesh is accepted.
    ok = _outcome(lambda: tp.apply(model, mesh["tp"]).tp)
    out["submesh_result"] = ok
    return out


# ---------------------------------------------------------------------------------------------
# Sizes that do not divide


def test_indivisible_heads_resolve_and_check():
    # The query heads split balanced at tp=4 (2, 2, 1, 1), and q_norm's rows with them; k_norm holds
    # one weight row per kv head, 3, which neither split nor follow the query heads: refused, naming it.
    model = tp.testing.models.tiny_model("cohere", **COHERE_6_3)
    resolved = tp.resolve(model, 4)
    with pytest.raises(tp.SizeError) as info:
        tp.checks.sizes.check(model, resolved, 4)
    message = str(info.value)
    assert "model.layers.*.self_attn.k_norm: weight.shape[0] = 3 does not divide by tp=4" in message
    assert "q_norm" not in message
    # The TP sizes that would work are listed: the 3 kv heads' norm rows split over 1 or 3 ranks
    assert message.rstrip().endswith(": 1, 3")
    # One line per module pattern, not one per layer.
    assert message.count("k_norm") == 1
    tp.checks.sizes.check(model, resolved, 3)


def test_indivisible_fused_sizes():
    # phi3 fuses gate and up (128 rows each), which do not split over 3 ranks
    model = tp.testing.models.build(tp.testing.models.family_config("phi3"), device="meta")
    resolved = tp.resolve(model, 3)
    lines, sizes = tp.checks.sizes.problems(model, resolved, 3)
    assert lines and all("tp=3" in line for line in lines)
    assert any("gate_up_proj" in line for line in lines)
    # A vocabulary that does not divide is sharded unevenly (exact), so it is not a problem.
    assert not any("embed_tokens" in line or "lm_head" in line for line in lines)
    assert 3 not in sizes and {1, 2, 4} <= set(sizes)
    with pytest.raises(tp.SizeError, match="TP sizes that divide"):
        tp.checks.sizes.check(model, resolved, 3)


def test_indivisible_heads_apply_on_4_ranks(pool4):
    results = pool4.run(_rank_apply_indivisible_heads)
    assert len(results) == 4
    for out in results:
        assert out["raised"] and out["type"] == "SizeError" and out["is_tp_error"], out
        message = out["message"]
        assert "self_attn.k_norm: weight.shape[0] = 3 does not divide by tp=4" in message
        assert message.rstrip().endswith("TP sizes that divide every sharded size of this model: 1, 3")
        # Early: raised before anything was sharded.
        assert not out["sharded_after_error"] and out["unchanged"]
    assert len({out["message"] for out in results}) == 1


# ---------------------------------------------------------------------------------------------
# Styles


def test_unknown_style_name_in_registry(tmp_path, llama_meta):
    path = tmp_path / "registry.toml"
    path.write_text(textwrap.dedent("""
        [families.mine]
        model_types = ["llama"]
        [families.mine.plan]
        "lm_head" = "vocab_parallel"
        """))
    with pytest.raises(tp.RegistryError) as info:
        tp.resolve(llama_meta, 2, registry=path)
    message = str(info.value)
    assert str(path) in message and "'mine'" in message and "'vocab_parallel'" in message
    assert "unknown style" in message and all(name in message for name in STYLES)


def test_unknown_style_name_parsed():
    with pytest.raises(ValueError, match="unknown style 'rowwize'.*allowed: colwise, rowwise"):
        StyleSpec.parse("rowwize")
    with pytest.raises(ValueError, match="takes no argument foo; allowed: kwarg"):
        StyleSpec.parse({"style": "block_input", "foo": 1})
    assert str(StyleSpec.parse({"style": "head_norm", "head_dim": 1})) == "head_norm(head_dim=1)"


@pytest.mark.parametrize("pattern, style, kind, supported", [
    ("model.norm", "rowwise", "LlamaRMSNorm", "Linear"),
    ("model.embed_tokens", "lm_head", "Embedding", "Linear"),
    ("lm_head", "embedding", "Linear", "Embedding"),
    ("layers.*.mlp", "colwise", "LlamaMLP", "Linear, Conv1D, Conv1d, Conv2d, Embedding"),
])
def test_style_on_unsupported_module_type(tmp_path, llama_meta, pattern, style, kind, supported):
    path = tmp_path / "registry.toml"
    path.write_text(textwrap.dedent(f"""
        [families.mine]
        model_types = ["llama"]
        extends = "llama"
        [families.mine.plan]
        "{pattern}" = "{style}"
        """))
    with pytest.raises(tp.PlanError) as info:
        tp.resolve(llama_meta, 2, registry=path)
    message = str(info.value)
    assert f"style {style!r}" in message and f"supports {supported}" in message and kind in message
    module = pattern.replace("layers.*", "model.layers.0")
    assert message.startswith(module + ":"), message


def test_loss_parallel_without_lm_head_style(llama_meta):
    with pytest.raises(tp.PlanError, match="loss_parallel=True.*lm_head"):
        tp.resolve(llama_meta, 2, keep="lm_head", loss_parallel=True)
    resolved = tp.resolve(llama_meta, 2, loss_parallel=True)
    assert str(resolved.decisions["lm_head"].style) == "lm_head(loss_parallel=True)"


# ---------------------------------------------------------------------------------------------
# Families


def test_unknown_family_resolve(llama_meta):
    with pytest.raises(tp.PlanError) as info:
        tp.resolve(llama_meta, 2, family="lama")
    message = str(info.value)
    assert "no family 'lama'" in message
    assert "did you mean llama" in message
    assert "Known families:" in message
    for name in ("llama", "mistral", "qwen3", "mixtral"):
        assert name in message


def test_unknown_family_tiny_model():
    with pytest.raises(tp.PlanError, match="no family 'not_a_family'.*Known families:.*llama"):
        tp.testing.models.tiny_model("not_a_family")


def test_unknown_family_from_user_registry_is_known(tmp_path, llama_meta):
    path = tmp_path / "registry.toml"
    path.write_text('[families.mine]\nmodel_types = ["llama"]\nextends = "llama"\n')
    with pytest.raises(tp.PlanError, match="Known families:.*mine"):
        tp.resolve(llama_meta, 2, registry=path, family="minee")
    assert tp.resolve(llama_meta, 2, registry=path, family="mine").family == "mine"


def test_unrecognised_model_without_blocks():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(tp.PlanError) as info:
        tp.resolve(model, 2)
    message = str(info.value)
    assert "Sequential" in message and "no family" in message and "repeated blocks" in message


# ---------------------------------------------------------------------------------------------
# Meshes and models already sharded


def test_mesh_that_is_not_a_mesh():
    model = tp.testing.models.tiny_model("llama")
    with pytest.raises(tp.MeshError, match="needs a torch DeviceMesh, got int"):
        tp.apply(model, 2)
    assert not _has_dtensor(model)


def test_mesh_that_is_not_1d(pool4):
    results = pool4.run(_rank_apply_2d_mesh)
    for out in results:
        assert out["raised"] and out["type"] == "MeshError" and out["is_tp_error"], out
        message = out["message"]
        assert "1-D" in message and "2-D" in message
        assert "('dp', 'tp')" in message and "(2, 2)" in message
        assert "mesh['tp']" in message
        assert not out["sharded_after_error"]
        assert out["submesh_result"] == {"raised": False, "type": None, "message": "", "is_tp_error": False,
                                         "value": 2}


def test_model_sharded_twice(pool2):
    results = pool2.run(_rank_apply_twice)
    for out in results:
        assert not out["first"]["raised"] and out["first"]["value"] == "llama", out
        second = out["second"]
        assert second["raised"] and second["type"] == "AlreadyShardedError" and second["is_tp_error"], second
        message = second["message"]
        assert "LlamaForCausalLM" in message and "already sharded" in message
        assert "model.embed_tokens.weight" in message
        assert out["same_shapes"]
        assert out["logits_shape"] == (1, 3, 256)


def test_errors_share_a_base_class():
    for cls in (tp.PlanError, tp.RegistryError, tp.SizeError, tp.MeshError, tp.AlreadyShardedError):
        assert issubclass(cls, tp.TPError)
