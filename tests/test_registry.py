"""Registry validation (built-in and user registry files) and the merge of a user registry over
the built-in one. No processes: plans are resolved with ``tp.resolve`` on the meta device,
except one end-to-end check that ``tp.apply(registry=...)`` shards by the user's family."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import tp
import tp.testing.models
from tp.plan.registry import Family, builtin_registry_path, load_registry
from tp.styles import STYLES, StyleSpec

LLAMA_LINEARS = {
    "model.layers.0.self_attn.q_proj": "colwise",
    "model.layers.0.self_attn.k_proj": "colwise(parts=[kv])",
    "model.layers.0.self_attn.v_proj": "colwise(parts=[kv])",
    "model.layers.0.self_attn.o_proj": "rowwise",
    "model.layers.0.mlp.gate_proj": "colwise",
    "model.layers.0.mlp.up_proj": "colwise",
    "model.layers.0.mlp.down_proj": "rowwise",
}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


# ---------------------------------------------------------------------------------------------
# The built-in registry


def test_builtin_registry_loads_and_is_consistent():
    reg = load_registry()
    assert builtin_registry_path().is_file()
    for name in ("llama", "mistral", "qwen2", "qwen3", "cohere", "starcoder2", "mixtral"):
        assert name in reg.families, name
    # Every family is recognisable by itself or through its ancestors, and every ancestor exists.
    for name in reg.families:
        lineage = reg.lineage(name)
        assert lineage[-1] == name and all(a in reg.families for a in lineage)
        family = reg.families[name]
        assert family.model_types or family.classes
        if family.model_types:
            assert reg.model_type(name)
        for pattern, style in family.plan.items():
            assert isinstance(style, StyleSpec) and style.name in STYLES, (name, pattern, style)
        # Every python_plan the built-in registry names exists next to it.
        if family.python_plan:
            assert reg.python_plan_path(name).is_file(), name
    assert reg.python_plan_path("cohere").is_file()
    assert all(isinstance(s, StyleSpec) for s in reg.plan("cohere", _DummyModel()).values())
    # The built-in lists are loaded.
    assert "o_proj" in reg.allreduce_linear_items and "down_proj" in reg.allreduce_linear_items
    assert "mlp.gate" in reg.keep_linear_items
    assert reg.tiny_config("mixtral")["num_local_experts"] == 4
    assert reg.tiny_config("mixtral")["hidden_size"] == 64


class _DummyConfig:
    use_qk_norm = False


class _DummyModel:
    config = _DummyConfig()


def test_builtin_llama_plan_resolves(llama_meta):
    resolved = tp.resolve(llama_meta, 2)
    assert resolved.family == "llama"
    for path, style in LLAMA_LINEARS.items():
        decision = resolved.decisions[path]
        assert str(decision.style) == style
        assert decision.source == "family llama"
    assert resolved.decisions["model.embed_tokens"].style.name == "embedding"
    assert resolved.decisions["lm_head"].style.name == "lm_head"
    assert resolved.decisions["model.layers.0.self_attn"].source == "derived"
    assert resolved.warnings == []


def test_derived_family_inherits_plan():
    model = tp.testing.models.build(tp.testing.models.family_config("mistral"), device="meta")
    resolved = tp.resolve(model, 2)
    assert resolved.family == "mistral"
    assert str(resolved.decisions["model.layers.1.mlp.down_proj"].style) == "rowwise"
    assert resolved.decisions["model.layers.1.mlp.down_proj"].source == "family mistral"


# ---------------------------------------------------------------------------------------------
# Malformed entries: each one a RegistryError naming file, family, key, what was found, what is allowed

ALL_STYLES = list(STYLES)

MALFORMED = {
    "unknown_style": (
        """
        [families.foo]
        model_types = ["foo"]
        [families.foo.plan]
        "layers.*.q_proj" = "colwize"
        """,
        ["'foo'", "plan", "layers.*.q_proj", "'colwize'", "unknown style", *ALL_STYLES],
    ),
    "style_bad_argument": (
        """
        [families.foo]
        model_types = ["foo"]
        [families.foo.plan]
        "lm_head" = { style = "lm_head", gather = true }
        """,
        ["'foo'", "plan.lm_head", "gather", "lm_head", "allowed", "loss_parallel"],
    ),
    "style_argument_for_style_without_arguments": (
        """
        [families.foo]
        model_types = ["foo"]
        [families.foo.plan]
        "o_proj" = { style = "keep", dim = 1 }
        """,
        ["'foo'", "plan.o_proj", "keep", "dim", "allowed", "none"],
    ),
    "style_not_a_name_nor_table": (
        """
        [families.foo]
        model_types = ["foo"]
        [families.foo.plan]
        "o_proj" = 3
        """,
        ["'foo'", "plan.o_proj", "found 3", "style name", "'style' key"],
    ),
    "unknown_family_key": (
        """
        [families.foo]
        model_type = ["foo"]
        """,
        # The allowed keys must be named in the message itself.
        ["'foo'", "'model_type'", "['foo']", "unknown key", *Family.model_fields],
    ),
    "unknown_top_level_key": (
        """
        allreduce_items = ["my_out"]
        """,
        ["'allreduce_items'", "['my_out']", "unknown key", "allreduce_linear_items", "keep_linear_items",
         "families"],
    ),
    "pattern_list_wrong_type": (
        """
        [families.foo]
        model_types = ["foo"]
        divide = 5
        """,
        ["'foo'", "'divide'", "found 5", "list"],
    ),
    "pattern_list_not_strings": (
        """
        keep_linear_items = ["router", 7]
        """,
        ["'keep_linear_items'", "7", "str"],
    ),
    "not_recognisable": (
        """
        [families.foo]
        [families.foo.plan]
        "o_proj" = "rowwise"
        """,
        ["'foo'", "o_proj", "model_types", "classes"],
    ),
    "extends_missing_family": (
        """
        [families.foo]
        model_types = ["foo"]
        extends = "lama"
        """,
        ["'foo'", "'extends'", "found 'lama'", "allowed", "llama", "mistral"],
    ),
    "extends_cycle": (
        """
        [families.foo]
        model_types = ["foo"]
        extends = "bar"
        [families.bar]
        model_types = ["bar"]
        extends = "foo"
        """,
        ["'extends'", "cycle"],
    ),
    "python_plan_missing": (
        """
        [families.foo]
        model_types = ["foo"]
        python_plan = "plans/missing.py"
        """,
        ["'foo'", "'python_plan'", "'plans/missing.py'", "does not exist", "allowed", ".py file"],
    ),
    "invalid_toml": (
        """
        [families.foo
        model_types = ["foo"]
        """,
        ["not valid TOML", "line 2"],
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_entry_is_a_registry_error(case, tmp_path):
    text, fragments = MALFORMED[case]
    path = write(tmp_path / "registry.toml", text)
    with pytest.raises(tp.RegistryError) as info:
        load_registry(path)
    message = str(info.value)
    assert str(path) in message, message
    missing = [f for f in fragments if f not in message]
    assert not missing, f"message lacks {missing}:\n{message}"


def test_malformed_registry_fails_resolve_and_apply_early(tmp_path, llama_meta):
    path = write(tmp_path / "registry.toml", MALFORMED["unknown_style"][0])
    with pytest.raises(tp.RegistryError, match="colwize"):
        tp.resolve(llama_meta, 2, registry=path)
    with pytest.raises(tp.RegistryError, match="colwize"):
        tp.testing.models.family_config("llama", registry=path)


def test_malformed_registry_from_environment(tmp_path, llama_meta, monkeypatch):
    path = write(tmp_path / "env_registry.toml", MALFORMED["extends_missing_family"][0])
    monkeypatch.setenv("TP_REGISTRY", str(path))
    with pytest.raises(tp.RegistryError) as info:
        tp.resolve(llama_meta, 2)
    assert str(path) in str(info.value) and "'lama'" in str(info.value)


def test_missing_user_registry_file(tmp_path, llama_meta):
    path = tmp_path / "nope.toml"
    with pytest.raises(tp.RegistryError, match="does not exist") as info:
        tp.resolve(llama_meta, 2, registry=path)
    assert str(path) in str(info.value)


def test_all_errors_of_a_file_are_listed(tmp_path):
    path = write(tmp_path / "registry.toml", """
        [families.foo]
        model_types = ["foo"]
        [families.foo.plan]
        "q_proj" = "colwize"
        [families.bar]
        model_types = ["bar"]
        [families.bar.plan]
        "o_proj" = "rowwize"
        """)
    with pytest.raises(tp.RegistryError) as info:
        load_registry(path)
    assert "'colwize'" in str(info.value) and "'rowwize'" in str(info.value)


def test_bad_registry_does_not_poison_later_loads(tmp_path, llama_meta):
    path = write(tmp_path / "registry.toml", MALFORMED["unknown_style"][0])
    with pytest.raises(tp.RegistryError):
        load_registry(path)
    # The same file, fixed, is read again (the cache is keyed on the modification time).
    write(path, """
        [families.foo]
        model_types = ["foo"]
        [families.foo.plan]
        "layers.*.q_proj" = "colwise"
        """)
    assert "foo" in load_registry(path).families
    assert tp.resolve(llama_meta, 2).family == "llama"


# ---------------------------------------------------------------------------------------------
# A user registry merged over the built-in one

# Attention sharded, the MLP left whole, the output projection kept whole.
USER_FAMILY = """
    [families.mine]
    model_types = ["llama"]
    [families.mine.plan]
    "model.embed_tokens" = "embedding"
    "layers.*.self_attn.q_proj" = "colwise"
    "layers.*.self_attn.k_proj" = "colwise"
    "layers.*.self_attn.v_proj" = "colwise"
    "layers.*.self_attn.o_proj" = "rowwise"
    "lm_head" = "keep"
    """


def _assert_user_plan(resolved, family="mine"):
    assert resolved.family == family
    lm_head = resolved.decisions["lm_head"]
    assert lm_head.style.name == "keep" and lm_head.source == f"family {family}"
    q = resolved.decisions["model.layers.1.self_attn.q_proj"]
    assert q.style.name == "colwise" and q.source == f"family {family}"
    # The MLP is not in the user's plan, so nothing of it is sharded.
    assert not any(".mlp" in path for path in resolved.decisions)


def test_user_registry_argument_wins(tmp_path, llama_meta):
    path = write(tmp_path / "registry.toml", USER_FAMILY)
    _assert_user_plan(tp.resolve(llama_meta, 2, registry=path))
    _assert_user_plan(tp.resolve(llama_meta, 2, registry=str(path)))
    # The built-in family is still there and can be named.
    assert tp.resolve(llama_meta, 2, registry=path, family="llama").decisions["lm_head"].source == "family llama"
    # Without the user registry, the built-in family is used again.
    assert tp.resolve(llama_meta, 2).family == "llama"


def test_user_registry_from_environment_wins(tmp_path, llama_meta, monkeypatch):
    path = write(tmp_path / "registry.toml", USER_FAMILY)
    monkeypatch.setenv("TP_REGISTRY", str(path))
    _assert_user_plan(tp.resolve(llama_meta, 2))


def test_user_registry_relative_environment_path(tmp_path, llama_meta, monkeypatch):
    write(tmp_path / "conf" / "registry.toml", USER_FAMILY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TP_REGISTRY", "conf/registry.toml")
    _assert_user_plan(tp.resolve(llama_meta, 2))


def test_registry_argument_beats_environment(tmp_path, llama_meta, monkeypatch):
    env_path = write(tmp_path / "env.toml", USER_FAMILY.replace("mine", "from_env"))
    arg_path = write(tmp_path / "arg.toml", USER_FAMILY.replace("mine", "from_arg"))
    monkeypatch.setenv("TP_REGISTRY", str(env_path))
    _assert_user_plan(tp.resolve(llama_meta, 2, registry=arg_path), family="from_arg")


def test_user_family_of_same_name_replaces_builtin(tmp_path, llama_meta):
    path = write(tmp_path / "registry.toml", USER_FAMILY.replace("mine", "llama"))
    _assert_user_plan(tp.resolve(llama_meta, 2, registry=path), family="llama")


def test_user_family_by_class_name(tmp_path, llama_meta):
    path = write(tmp_path / "registry.toml", USER_FAMILY.replace('model_types = ["llama"]',
                                                               'classes = ["LlamaForCausalLM"]'))
    _assert_user_plan(tp.resolve(llama_meta, 2, registry=path))


def test_user_family_extends_builtin(tmp_path, llama_meta):
    path = write(tmp_path / "registry.toml", """
        [families.mine]
        model_types = ["llama"]
        extends = "llama"
        [families.mine.plan]
        "lm_head" = "keep"
        """)
    resolved = tp.resolve(llama_meta, 2, registry=path)
    assert resolved.family == "mine"
    assert resolved.decisions["lm_head"].style.name == "keep"
    for module, style in LLAMA_LINEARS.items():
        assert str(resolved.decisions[module].style) == style
        assert resolved.decisions[module].source == "family mine"


def test_user_lists_extend_builtin_lists(tmp_path):
    path = write(tmp_path / "registry.toml", """
        allreduce_linear_items = ["my_out"]
        keep_linear_items = "my_router, my_gate"
        """)
    reg = load_registry(path)
    builtin = load_registry()
    assert reg.allreduce_linear_items == builtin.allreduce_linear_items + ["my_out"]
    assert reg.keep_linear_items == builtin.keep_linear_items + ["my_router", "my_gate"]
    assert set(reg.families) == set(builtin.families)


def test_user_python_plan_is_loaded_relative_to_user_registry(tmp_path, llama_meta, monkeypatch):
    registry = write(tmp_path / "reg" / "registry.toml", USER_FAMILY.replace(
        '[families.mine.plan]', 'python_plan = "plans/extra.py"\n    [families.mine.plan]'))
    write(tmp_path / "reg" / "plans" / "extra.py", """
        def plan(model):
            assert model.config.model_type == "llama"
            return {
                "lm_head": {"style": "lm_head", "loss_parallel": True},
                "layers.*.mlp.gate_proj": "colwise",
                "layers.*.mlp.up_proj": "colwise",
                "layers.*.mlp.down_proj": "rowwise",
            }
        """)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the python_plan path is relative to the registry, not the cwd
    resolved = tp.resolve(llama_meta, 2, registry=registry)
    assert resolved.family == "mine"
    head = resolved.decisions["lm_head"]
    assert str(head.style) == "lm_head(loss_parallel=True)" and head.source == "family mine"
    down = resolved.decisions["model.layers.1.mlp.down_proj"]
    assert down.style.name == "rowwise" and down.source == "family mine"
    assert resolved.decisions["model.layers.0.mlp.up_proj"].style.name == "colwise"
    assert resolved.decisions["model.layers.0.self_attn.o_proj"].style.name == "rowwise"


def test_user_python_plan_with_bad_style(tmp_path, llama_meta):
    registry = write(tmp_path / "registry.toml", """
        [families.mine]
        model_types = ["llama"]
        python_plan = "bad_plan.py"
        """)
    plan_file = write(tmp_path / "bad_plan.py", """
        def plan(model):
            return {"lm_head": "lm_heed"}
        """)
    with pytest.raises(tp.RegistryError) as info:
        tp.resolve(llama_meta, 2, registry=registry)
    message = str(info.value)
    for fragment in (str(plan_file), "'mine'", "'lm_heed'", "lm_head", "colwise"):
        assert fragment in message, message


def test_user_python_plan_without_plan_function(tmp_path, llama_meta):
    registry = write(tmp_path / "registry.toml", """
        [families.mine]
        model_types = ["llama"]
        python_plan = "empty.py"
        """)
    plan_file = write(tmp_path / "empty.py", "PLAN = {}\n")
    with pytest.raises(tp.RegistryError) as info:
        tp.resolve(llama_meta, 2, registry=registry)
    assert str(plan_file) in str(info.value) and "plan(model)" in str(info.value)
    assert "'mine'" in str(info.value)


def test_apply_with_user_registry_end_to_end(tmp_path, pool2):
    path = write(tmp_path / "registry.toml", USER_FAMILY)
    result = tp.verify("mine", tp=2, pool=pool2, registry=str(path))
    assert result.family == "mine"
    assert result.ok, result.table()
    lm_head = next(line for line in result.report.splitlines() if line.startswith("lm_head "))
    assert " keep " in lm_head and "family mine" in lm_head
    mlp = next(line for line in result.report.splitlines() if line.startswith("model.layers.0.mlp.down_proj "))
    assert "whole" in mlp and "not in plan" in mlp
