"""Plans whose styles do not fit together are refused before anything is sharded, naming the
module and the override or registry entry that caused it (tp/checks/consistency.py).
``tp.resolve`` lists the problems (``tp plan`` shows them); ``tp.apply`` refuses."""


import pytest

import tp
import tp.testing.models

CASES = {
    # override -> (module named, words of the reason)
    (("keep", "k_proj,v_proj"),): ("model.layers.0.self_attn.k_proj (keep, from argument 'k_proj')",
                                   "self_attn.q_proj beside it is column-parallel"),
    (("keep", "o_proj"),): ("model.layers.0.self_attn.o_proj (keep, from argument 'o_proj')",
                            "reads sharded features from model.layers.0.self_attn.k_proj"),
    (("keep", "q_proj"),): ("model.layers.0.self_attn.q_proj (keep, from argument 'q_proj')",
                            "self_attn.k_proj, self_attn.v_proj beside it are column-parallel"),
    (("keep", "up_proj"),): ("model.layers.0.mlp.up_proj (keep, from argument 'up_proj')",
                             "keep the whole unit (mlp.down_proj, mlp.gate_proj, mlp.up_proj)"),
    (("keep", "down_proj"),): ("model.layers.0.mlp.down_proj (keep, from argument 'down_proj')",
                               "brings sharded features to the residual stream"),
    (("allreduce", "q_proj"),): ("model.layers.0.self_attn.q_proj (rowwise, from argument 'q_proj')",
                                 "is row-parallel but reads whole features from the residual stream"),
    (("allreduce", "gate_proj"),): ("model.layers.0.mlp.gate_proj (rowwise, from argument 'gate_proj')",
                                    "is row-parallel but reads whole features"),
    (("allreduce", "*"),): ("model.layers.0.self_attn.k_proj (rowwise, from argument '*')", "row-parallel"),
    (("allreduce", "lm_head"),): ("lm_head (rowwise, from argument 'lm_head')",
                                  "outside the repeated blocks its input is whole"),
}


@pytest.mark.parametrize("override", list(CASES), ids=lambda o: "-".join(f"{k}={v}" for k, v in o))
def test_inconsistent_overrides_are_found_naming_module_and_source(llama_meta, override):
    module, reason = CASES[override]
    found = tp.resolve(llama_meta, 2, **dict(override)).inconsistencies
    assert any(module in line and reason in line for line in found), found


def _apply_on_rank(override: dict) -> tuple[str, str]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from tp.testing.models import tiny_model

    model = tiny_model("llama")
    try:
        tp.apply(model, init_device_mesh("cpu", (dist.get_world_size(),)), **override)
    except tp.TPError as e:
        return type(e).__name__, str(e)
    return "sharded", ""


def test_apply_refuses_an_inconsistent_plan_on_every_rank(pool2):
    for name, message in pool2.run(_apply_on_rank, {"keep": "k_proj,v_proj"}):
        assert name == "PlanError" and "the plan is inconsistent" in message, message
        assert "model.layers.0.self_attn.v_proj (keep, from argument 'k_proj,v_proj'" not in message
        assert "model.layers.0.self_attn.v_proj (keep, from argument 'v_proj')" in message, message
    assert pool2.run(_apply_on_rank, {}) == [("sharded", ""), ("sharded", "")]


def test_the_environment_and_a_config_file_are_named_as_the_source(llama_meta, monkeypatch, tmp_path):
    monkeypatch.setenv("KEEP_LINEAR_ITEMS", "k_proj")
    found = tp.resolve(llama_meta, 2).inconsistencies
    assert any("k_proj (keep, from environment 'k_proj')" in line for line in found), found
    monkeypatch.delenv("KEEP_LINEAR_ITEMS")
    config = tmp_path / "tp.toml"
    config.write_text('keep_linear_items = ["v_proj"]\n')
    found = tp.resolve(llama_meta, 2, config=config).inconsistencies
    assert any("v_proj (keep, from config file" in line for line in found), found


def test_a_registry_entry_that_contradicts_the_plan_is_named(llama_meta, mine_registry):
    registry = mine_registry('"layers.*.mlp.down_proj" = "colwise"')
    found = tp.resolve(llama_meta, 2, registry=registry).inconsistencies
    assert any("down_proj (colwise, from family mine 'layers.*.mlp.down_proj') reads sharded features" in line
               for line in found), found


def test_an_empty_family_plan_is_refused(llama_meta, tmp_path):
    registry = tmp_path / "registry.toml"
    registry.write_text('[families.mine]\nmodel_types = ["llama"]\n')
    with pytest.raises(tp.PlanError, match="family 'mine' has an empty plan"):
        tp.resolve(llama_meta, 2, registry=registry)


def test_keeping_a_whole_unit_is_consistent_and_exact(pool2):
    result = tp.verify("llama", tp=2, keep="self_attn.*", pool=pool2)
    assert result.ok, result.table()
    assert result.per_block_forward == 1  # only the MLP's all-reduce is left


# ---------------------------------------------------------------------------------------------
# fix_overrides: an override that keeps part of a column-parallel unit keeps the whole unit


def _with_environment(variables: dict, task, *args):
    """``task(*args)`` on a rank with ``variables`` set in its environment (the pool's processes
    started before the test could set them)."""
    import os

    previous = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        return task(*args)
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def test_fix_overrides_keeps_the_whole_attention_unit_and_is_exact(pool2):
    from tp.testing.verify import VerifyResult, VerifySpec, verify_rank

    spec = VerifySpec("llama", apply_kwargs={"fix_overrides": True})
    result = VerifyResult(**pool2.run(_with_environment, {"KEEP_LINEAR_ITEMS": "k_proj"}, verify_rank, spec)[0])
    assert result.ok, result.table()
    assert result.logits_max_abs <= 1e-5 and result.worst_grad_rel <= 1e-4
    unit = "(self_attn.k_proj, self_attn.o_proj, self_attn.q_proj, self_attn.v_proj)"
    note = next(w for w in result.warnings if "keeps self_attn.k_proj whole" in w)
    assert note.startswith("environment 'k_proj'") and f"its whole unit {unit} is kept whole in 2 blocks" in note
    rows = [line.split() for line in result.report.splitlines() if ".self_attn." in line]
    assert len(rows) == 8 and all(row[2:5] == ["keep", "environment,", "whole"] for row in rows), rows
    assert f"warning: {note}" in result.report
    assert result.per_block_forward == 1  # only the MLP's all-reduce is left


def test_without_fix_overrides_the_partial_unit_is_refused_naming_the_option(pool2):
    for name, message in pool2.run(_with_environment, {"KEEP_LINEAR_ITEMS": "k_proj"}, _apply_on_rank, {}):
        assert name == "PlanError" and "model.layers.0.self_attn.k_proj (keep, from environment 'k_proj')" in message
        assert "fix_overrides=True (--fix-overrides) keeps the whole unit" in message


def test_fix_overrides_fixes_only_the_partial_unit(llama_meta):
    with pytest.warns(UserWarning, match=r"argument 'up_proj' keeps mlp.up_proj whole, so its whole unit "
                                         r"\(mlp.down_proj, mlp.gate_proj, mlp.up_proj\) is kept whole"):
        resolved = tp.resolve(llama_meta, 2, keep="up_proj,o_proj", fix_overrides=True)
    mlp = {str(resolved.decisions[f"model.layers.1.mlp.{n}"].style) for n in ("gate_proj", "up_proj", "down_proj")}
    assert mlp == {"keep"}
    # a kept o_proj is not one linear of a column-parallel group: no obvious fix, still refused
    assert any(line.startswith("model.layers.0.self_attn.o_proj (keep, from argument 'o_proj') reads sharded")
               for line in resolved.inconsistencies), resolved.inconsistencies


def test_an_override_of_one_later_layer_is_checked(llama_meta):
    found = tp.resolve(llama_meta, 2, keep="model.layers.1.self_attn.k_proj").inconsistencies
    assert len(found) == 1 and found[0].startswith("model.layers.1.self_attn.k_proj (keep, from argument"), found
    with pytest.warns(UserWarning, match="is kept whole in model.layers.1 "):
        fixed = tp.resolve(llama_meta, 2, keep="model.layers.1.self_attn.k_proj", fix_overrides=True)
    styles = {p: str(d.style) for p, d in fixed.decisions.items() if ".self_attn." in p}
    assert styles["model.layers.1.self_attn.q_proj"] == "keep" and styles["model.layers.0.self_attn.q_proj"] == "colwise"
    assert not fixed.inconsistencies


def test_an_override_inside_a_mixer_style_is_refused_or_keeps_the_mixer(pool2):
    """A Mamba mixer's style shards its linears together: an override on one of them is refused,
    naming the mixer; one that keeps it whole can keep the whole mixer instead, with the norms the
    family styles inside it (Jamba's dt, B and C norms would otherwise sum complete gradients)."""
    model = tp.testing.models.tiny_model("jamba")
    found = tp.resolve(model, 2, allreduce="in_proj").inconsistencies
    assert found == ["model.layers.0.mamba.in_proj (rowwise, from argument 'in_proj') is sharded by the style of "
                     "model.layers.0.mamba (mamba_mixer), which leaves it no style of its own; leave it out of the "
                     "plan"], found
    (kept,) = tp.resolve(model, 2, keep="x_proj").inconsistencies
    assert kept.endswith("or keep model.layers.0.mamba whole with every module inside (fix_overrides=True "
                         "(--fix-overrides) does)"), kept
    with pytest.warns(UserWarning, match=r"its whole unit \(mamba, mamba.x_proj, mamba.dt_layernorm"):
        fixed = tp.resolve(model, 2, keep="x_proj", fix_overrides=True)
    inside = {p: str(d.style) for p, d in fixed.decisions.items() if ".mamba" in p}
    assert set(inside.values()) == {"keep"} and "model.layers.2.mamba.b_layernorm" in inside
    result = tp.verify("jamba", tp=2, pool=pool2, keep=["x_proj"], fix_overrides=True)
    assert result.ok, result.table()
