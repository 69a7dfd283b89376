"""ALLREDUCE_LINEAR_ITEMS / KEEP_LINEAR_ITEMS overrides and their precedence, as documented in
tp/plan/overrides.py, tp/plan/family.py and tp/resolution.py: arguments > environment > config file > family plan > inferred.

Plans are resolved with ``tp.resolve`` on the meta device; one test shards for real on 2 ranks."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import tp
import tp.testing.models
from tp.checks import report as report_

LAYERS = (0, 1)


@pytest.fixture(scope="module")
def neox():
    """An HF model of a type the registry does not know: its plan is inferred."""
    from transformers import AutoConfig

    # GPT-NeoX's layout under another model type, which no family claims.
    config = AutoConfig.for_model("gpt_neox_japanese", hidden_size=64, intermediate_size=128,
                                  num_attention_heads=8, num_hidden_layers=2, vocab_size=256)
    return tp.testing.models.build(config, device="meta")


def write_config(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def style(resolved, path):
    return str(resolved.decisions[path].style)


def source(resolved, path):
    return resolved.decisions[path].source


def family_default(resolved, path):
    return str(resolved.decisions[path].style), resolved.decisions[path].source


# ---------------------------------------------------------------------------------------------
# Each source on its own


def test_environment_allreduce_makes_rowwise(llama_meta, monkeypatch):
    monkeypatch.setenv("ALLREDUCE_LINEAR_ITEMS", "q_proj")
    resolved = tp.resolve(llama_meta, 2)
    for i in LAYERS:
        d = resolved.decisions[f"model.layers.{i}.self_attn.q_proj"]
        assert (str(d.style), d.source, d.pattern) == ("rowwise", "environment", "q_proj")
        # Untouched modules keep the family's decision.
        assert family_default(resolved, f"model.layers.{i}.self_attn.k_proj") == ("colwise(parts=[kv])", "family llama")
        assert family_default(resolved, f"model.layers.{i}.mlp.down_proj") == ("rowwise", "family llama")


def test_environment_keep_makes_keep(llama_meta, monkeypatch):
    monkeypatch.setenv("KEEP_LINEAR_ITEMS", " gate_proj , up_proj,, ")
    resolved = tp.resolve(llama_meta, 2)
    for i in LAYERS:
        for name in ("gate_proj", "up_proj"):
            d = resolved.decisions[f"model.layers.{i}.mlp.{name}"]
            assert (str(d.style), d.source, d.pattern) == ("keep", "environment", name)
        assert family_default(resolved, f"model.layers.{i}.mlp.down_proj") == ("rowwise", "family llama")
    assert resolved.warnings == []


@pytest.mark.parametrize("keep", ["lm_head, o_proj", ["lm_head", "o_proj"], ("lm_head", " o_proj ")])
def test_argument_accepts_string_or_list(llama_meta, keep):
    resolved = tp.resolve(llama_meta, 2, keep=keep, allreduce="q_proj")
    assert (style(resolved, "lm_head"), source(resolved, "lm_head")) == ("keep", "argument")
    for i in LAYERS:
        assert (style(resolved, f"model.layers.{i}.self_attn.o_proj"),
                source(resolved, f"model.layers.{i}.self_attn.o_proj")) == ("keep", "argument")
        assert (style(resolved, f"model.layers.{i}.self_attn.q_proj"),
                source(resolved, f"model.layers.{i}.self_attn.q_proj")) == ("rowwise", "argument")


def test_config_file_argument(llama_meta, tmp_path):
    path = write_config(tmp_path / "overrides.toml", """
        allreduce_linear_items = ["up_proj"]
        keep_linear_items = "lm_head"
        """)
    resolved = tp.resolve(llama_meta, 2, config=path)
    assert (style(resolved, "lm_head"), source(resolved, "lm_head")) == ("keep", "config file overrides.toml")
    d = resolved.decisions["model.layers.1.mlp.up_proj"]
    assert (str(d.style), d.source, d.pattern) == ("rowwise", "config file overrides.toml", "up_proj")


def test_config_file_from_environment(llama_meta, tmp_path, monkeypatch):
    path = write_config(tmp_path / "from_env.toml", 'keep_linear_items = ["lm_head"]\n')
    monkeypatch.setenv("TP_CONFIG", str(path))
    resolved = tp.resolve(llama_meta, 2)
    assert (style(resolved, "lm_head"), source(resolved, "lm_head")) == ("keep", "config file from_env.toml")


def test_config_argument_replaces_config_environment(llama_meta, tmp_path, monkeypatch):
    env_path = write_config(tmp_path / "env.toml", 'keep_linear_items = ["lm_head"]\n')
    arg_path = write_config(tmp_path / "arg.toml", 'keep_linear_items = ["down_proj"]\n')
    monkeypatch.setenv("TP_CONFIG", str(env_path))
    resolved = tp.resolve(llama_meta, 2, config=arg_path)
    assert source(resolved, "model.layers.0.mlp.down_proj") == "config file arg.toml"
    assert family_default(resolved, "lm_head") == ("lm_head", "family llama")


# ---------------------------------------------------------------------------------------------
# Precedence: argument > environment > config file > family plan

Q = "model.layers.0.self_attn.q_proj"

PRECEDENCE = [
    # (sources active, expected style of q_proj, expected source)
    ((), "colwise", "family llama"),
    (("config",), "keep", "config file prec.toml"),
    (("env",), "rowwise", "environment"),
    (("argument",), "keep", "argument"),
    (("config", "env"), "rowwise", "environment"),
    (("config", "argument"), "keep", "argument"),
    (("env", "argument"), "keep", "argument"),
    (("config", "env", "argument"), "keep", "argument"),
]


@pytest.mark.parametrize("active, expected_style, expected_source", PRECEDENCE,
                         ids=["+".join(p[0]) or "family" for p in PRECEDENCE])
def test_precedence(llama_meta, tmp_path, monkeypatch, active, expected_style, expected_source):
    kwargs = {}
    if "config" in active:
        kwargs["config"] = write_config(tmp_path / "prec.toml", 'keep_linear_items = ["q_proj"]\n')
    if "env" in active:
        monkeypatch.setenv("ALLREDUCE_LINEAR_ITEMS", "self_attn.q_proj")
    if "argument" in active:
        kwargs["keep"] = "layers.*.self_attn.q_proj"
    resolved = tp.resolve(llama_meta, 2, **kwargs)
    assert (style(resolved, Q), source(resolved, Q)) == (expected_style, expected_source)
    # The report shows the same decision.
    report = report_.build(llama_meta, resolved, 2)
    assert (report.style_of(Q), report.source_of(Q)) == (expected_style, expected_source)


def test_each_source_decides_only_what_it_matches(llama_meta, tmp_path, monkeypatch):
    config = write_config(tmp_path / "c.toml", """
        keep_linear_items = ["q_proj", "k_proj", "v_proj"]
        """)
    monkeypatch.setenv("ALLREDUCE_LINEAR_ITEMS", "k_proj")
    monkeypatch.setenv("KEEP_LINEAR_ITEMS", "gate_proj")
    resolved = tp.resolve(llama_meta, 2, config=config, allreduce="v_proj")
    prefix = "model.layers.1"
    assert family_default(resolved, f"{prefix}.self_attn.q_proj") == ("keep", "config file c.toml")
    assert family_default(resolved, f"{prefix}.self_attn.k_proj") == ("rowwise", "environment")
    assert family_default(resolved, f"{prefix}.self_attn.v_proj") == ("rowwise", "argument")
    assert family_default(resolved, f"{prefix}.mlp.gate_proj") == ("keep", "environment")
    assert family_default(resolved, f"{prefix}.mlp.up_proj") == ("colwise", "family llama")
    assert family_default(resolved, f"{prefix}.self_attn.o_proj") == ("rowwise", "family llama")
    assert resolved.warnings == []


def test_conflict_across_sources_is_resolved_by_precedence(llama_meta, monkeypatch):
    # The same linear in different sources is no error: the higher source wins.
    monkeypatch.setenv("ALLREDUCE_LINEAR_ITEMS", "lm_head")
    resolved = tp.resolve(llama_meta, 2, keep="lm_head")
    assert family_default(resolved, "lm_head") == ("keep", "argument")


def test_overrides_beat_inferred_plan(neox, monkeypatch):
    base = tp.resolve(neox, 2)
    assert base.family is None
    attn, mlp = "gpt_neox_japanese.layers.0.attention", "gpt_neox_japanese.layers.0.mlp"
    assert family_default(base, f"{attn}.query_key_value") == ("colwise", "inferred (dataflow)")
    assert family_default(base, f"{attn}.dense") == ("rowwise", "inferred (dataflow)")
    assert family_default(base, f"{mlp}.dense_4h_to_h") == ("rowwise", "inferred (dataflow)")

    monkeypatch.setenv("KEEP_LINEAR_ITEMS", "attention.dense")
    resolved = tp.resolve(neox, 2, allreduce="dense_4h_to_h")
    assert family_default(resolved, f"{attn}.dense") == ("keep", "environment")
    assert family_default(resolved, f"{mlp}.dense_4h_to_h") == ("rowwise", "argument")
    assert family_default(resolved, f"{mlp}.dense_h_to_4h") == ("colwise", "inferred (dataflow)")


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc_in = nn.Linear(8, 16)
        self.fc_out = nn.Linear(16, 8)

    def forward(self, x):
        return x + self.fc_out(torch.relu(self.fc_in(x)))


class _PlainNet(nn.Module):
    """A plain PyTorch model: repeated blocks, no Hugging Face methods."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Block() for _ in range(2)])
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_overrides_beat_inferred_plan_of_plain_module(monkeypatch):
    monkeypatch.setenv("KEEP_LINEAR_ITEMS", "blocks.1.fc_in")
    resolved = tp.resolve(_PlainNet(), 2)
    assert resolved.family is None
    assert family_default(resolved, "blocks.0.fc_in") == ("colwise", "inferred")
    assert family_default(resolved, "blocks.0.fc_out") == ("rowwise", "inferred")
    assert family_default(resolved, "blocks.1.fc_in") == ("keep", "environment")


# ---------------------------------------------------------------------------------------------
# Pattern matching


@pytest.mark.parametrize("pattern, expected", [
    # bare name: matches by suffix, in every layer
    ("o_proj", {f"model.layers.{i}.self_attn.o_proj" for i in LAYERS}),
    # a dotted suffix
    ("mlp.down_proj", {f"model.layers.{i}.mlp.down_proj" for i in LAYERS}),
    # wildcards
    ("mlp.*_proj", {f"model.layers.{i}.mlp.{n}" for i in LAYERS for n in ("gate_proj", "up_proj", "down_proj")}),
    ("layers.*.self_attn.?_proj",
     {f"model.layers.{i}.self_attn.{n}" for i in LAYERS for n in ("q_proj", "k_proj", "v_proj", "o_proj")}),
    ("layers.1.*.*", {f"model.layers.1.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                      "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                      "mlp.down_proj")}),
    # a full path: exactly that module
    ("model.layers.1.self_attn.k_proj", {"model.layers.1.self_attn.k_proj"}),
    ("lm_head", {"lm_head"}),
])
def test_pattern_matching(llama_meta, pattern, expected):
    resolved = tp.resolve(llama_meta, 2, keep=pattern)
    kept = {p for p, d in resolved.decisions.items() if d.source == "argument"}
    assert kept == expected
    assert all(style(resolved, p) == "keep" and resolved.decisions[p].pattern == pattern for p in kept)
    assert resolved.warnings == []


@pytest.mark.parametrize("pattern", ["proj", "_proj", "self_attn.o", "layers.2.self_attn.o_proj", "x.model.lm_head"])
def test_pattern_parts_match_whole_names(llama_meta, pattern):
    # A pattern's parts match whole path parts, never substrings; so these match nothing.
    with pytest.warns(UserWarning, match="matches no module"):
        resolved = tp.resolve(llama_meta, 2, keep=pattern)
    assert not any(d.source == "argument" for d in resolved.decisions.values())


# ---------------------------------------------------------------------------------------------
# Patterns that match nothing; conflicts; bad config files


@pytest.mark.parametrize("where", ["argument", "environment", "config"])
def test_unmatched_pattern_warns_with_closest_names(llama_meta, tmp_path, monkeypatch, where):
    kwargs = {}
    if where == "argument":
        kwargs["allreduce"] = "o_prj"
        expected_source = "argument"
    elif where == "environment":
        monkeypatch.setenv("ALLREDUCE_LINEAR_ITEMS", "o_prj")
        expected_source = "environment"
    else:
        kwargs["config"] = write_config(tmp_path / "typo.toml", 'allreduce_linear_items = ["o_prj"]\n')
        expected_source = "config file typo.toml"
    with pytest.warns(UserWarning) as record:
        resolved = tp.resolve(llama_meta, 2, **kwargs)
    messages = [str(w.message) for w in record if "o_prj" in str(w.message)]
    assert len(messages) == 1, [str(w.message) for w in record]
    message = messages[0]
    assert message.startswith(expected_source)
    assert "'o_prj'" in message and "matches no module" in message
    assert "closest" in message and "self_attn.o_proj" in message
    # The plan itself is unchanged, and the problem is kept for the report.
    assert family_default(resolved, "model.layers.0.self_attn.o_proj") == ("rowwise", "family llama")
    assert message in resolved.warnings


def test_unmatched_pattern_warning_points_at_caller(llama_meta):
    with pytest.warns(UserWarning, match="o_prj") as record:
        tp.resolve(llama_meta, 2, keep="o_prj")
    assert any(Path(w.filename).name == Path(__file__).name for w in record)


def test_matched_and_unmatched_patterns_together(llama_meta):
    with pytest.warns(UserWarning, match="'down_prj'"):
        resolved = tp.resolve(llama_meta, 2, keep="lm_head, down_prj")
    assert family_default(resolved, "lm_head") == ("keep", "argument")


@pytest.mark.parametrize("where", ["argument", "environment", "config"])
def test_unmatched_pattern_strict_raises(llama_meta, tmp_path, monkeypatch, where):
    kwargs = {"strict": True}
    if where == "argument":
        kwargs["keep"] = "lm_haed"
    elif where == "environment":
        monkeypatch.setenv("KEEP_LINEAR_ITEMS", "lm_haed")
    else:
        kwargs["config"] = write_config(tmp_path / "strict.toml", 'keep_linear_items = ["lm_haed"]\n')
    with pytest.raises(tp.PlanError) as info:
        tp.resolve(llama_meta, 2, **kwargs)
    message = str(info.value)
    assert "'lm_haed'" in message and "matches no module" in message and "lm_head" in message
    assert "strict" in message


def test_strict_family_pattern_that_matches_nothing(llama_meta, mine_registry):
    registry = mine_registry('"layers.*.mlp.gate_prj" = "colwise"')
    with pytest.warns(UserWarning, match="gate_prj"):
        tp.resolve(llama_meta, 2, registry=registry)
    with pytest.raises(tp.PlanError, match="family 'mine'.*gate_prj"):
        tp.resolve(llama_meta, 2, registry=registry, strict=True)


def test_same_linear_in_both_lists_of_arguments(llama_meta):
    with pytest.raises(tp.PlanError) as info:
        tp.resolve(llama_meta, 2, allreduce="o_proj", keep="layers.*.self_attn.o_proj")
    message = str(info.value)
    assert message.startswith("argument")
    assert "self_attn.o_proj" in message and "'o_proj'" in message and "'layers.*.self_attn.o_proj'" in message
    assert "both" in message


def test_same_linear_in_both_lists_of_environment(llama_meta, monkeypatch):
    monkeypatch.setenv("ALLREDUCE_LINEAR_ITEMS", "down_proj")
    monkeypatch.setenv("KEEP_LINEAR_ITEMS", "mlp.*")
    with pytest.raises(tp.PlanError) as info:
        tp.resolve(llama_meta, 2)
    message = str(info.value)
    assert message.startswith("environment") and "mlp.down_proj" in message and "both" in message


def test_same_linear_in_both_lists_of_config_file(llama_meta, tmp_path):
    path = write_config(tmp_path / "both.toml", """
        allreduce_linear_items = ["lm_head"]
        keep_linear_items = ["lm_head"]
        """)
    with pytest.raises(tp.PlanError) as info:
        tp.resolve(llama_meta, 2, config=path)
    message = str(info.value)
    assert "config file both.toml" in message and "lm_head" in message and "both" in message


@pytest.mark.parametrize("text, key", [
    ('allreduce_items = ["o_proj"]\n', "allreduce_items"),
    ('keep_linear_items = ["lm_head"]\nstrict = true\n', "strict"),
    ('KEEP_LINEAR_ITEMS = "lm_head"\n', "KEEP_LINEAR_ITEMS"),
])
def test_bad_config_file_key(llama_meta, tmp_path, text, key):
    path = write_config(tmp_path / "bad.toml", text)
    with pytest.raises(tp.PlanError) as info:
        tp.resolve(llama_meta, 2, config=path)
    message = str(info.value)
    assert str(path) in message and key in message
    assert "allreduce_linear_items" in message and "keep_linear_items" in message


def test_bad_config_file_value(llama_meta, tmp_path):
    path = write_config(tmp_path / "bad.toml", "keep_linear_items = 3\n")
    with pytest.raises(tp.PlanError) as info:
        tp.resolve(llama_meta, 2, config=path)
    assert str(path) in str(info.value) and "keep_linear_items" in str(info.value)


def test_config_file_not_toml_or_missing(llama_meta, tmp_path):
    path = write_config(tmp_path / "broken.toml", "keep_linear_items = [\n")
    with pytest.raises(tp.PlanError, match="not valid TOML") as info:
        tp.resolve(llama_meta, 2, config=path)
    assert str(path) in str(info.value)
    missing = tmp_path / "missing.toml"
    with pytest.raises(tp.PlanError, match="does not exist") as info:
        tp.resolve(llama_meta, 2, config=missing)
    assert str(missing) in str(info.value)


# ---------------------------------------------------------------------------------------------
# End to end, on 2 ranks


def test_keep_lm_head_end_to_end(pool2):
    result = tp.verify("llama", tp=2, pool=pool2, keep="lm_head")
    assert result.ok, result.table()
    lines = result.report.splitlines()
    lm_head = next(line for line in lines if line.startswith("lm_head "))
    assert lm_head.split()[:5] == ["lm_head", "Linear", "keep", "argument", "weight"]
    # kept whole: the per-rank shape is the global one
    assert lm_head.rstrip().endswith("weight [256, 64] -> [256, 64]")
    down = next(line for line in lines if line.startswith("model.layers.0.mlp.down_proj "))
    assert "rowwise" in down and "family llama" in down
    # No all-gather of the logits: the kept head computes full logits on each rank.
    assert "all_gather" not in result.forward_collectives
    assert result.logits_max_abs <= result.logits_atol


def test_keep_whole_mlp_end_to_end(pool2):
    # Keeping every linear of a sub-block is consistent: the MLP runs whole on each rank.
    result = tp.verify("llama", tp=2, pool=pool2, keep="mlp.*")
    assert result.ok, result.table()
    mlp = [line for line in result.report.splitlines() if ".mlp." in line]
    assert len(mlp) == 6 and all(line.split()[2:4] == ["keep", "argument"] for line in mlp)
    assert not any(line.startswith("model.layers.0.mlp ") for line in result.report.splitlines())
    # Only attention's o_proj all-reduces in a block now.
    assert (result.per_block_forward, result.per_block_backward) == (1, 1)
