"""The command line: a few runs in fresh processes, as a user runs it, and the rest through
``tp.cli.main`` in this process (the same code, without paying torch's import each time)."""

import json
import os
import re
import subprocess
import sys

import pytest

import tp
from tests.toy import TOY_REGISTRY
from tp.cli import main


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "tp", *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture
def cli(capsys, monkeypatch):
    """``cli(*args)`` -> (exit code, stdout, stderr) of ``python -m tp ARGS``, run in this process."""
    # main() sets these when unset, for the rest of its process: keep them from leaking into other tests
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    monkeypatch.setenv("PYTHONWARNINGS", "default")

    def call(*args):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse: --help, --version, usage errors
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err

    return call


def test_plan_is_a_dry_run_with_shapes_sources_and_collectives():
    out = run("plan", "llama", "--tp", "4")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    q_proj = next(l for l in lines if l.startswith("model.layers.0.self_attn.q_proj "))
    # the full-size default config, not the tiny one
    assert q_proj.split()[1:5] == ["Linear", "colwise", "family", "llama"]
    assert q_proj.endswith("weight [4096, 4096] -> [1024, 4096]")
    assert "  x 32 layers: model.layers.0-31" in lines  # one block shown for 32 of the same structure
    assert not [l for l in lines if l.startswith("model.layers.1.")]
    assert "forward 2 per block x 32 blocks" in out.stdout and "backward 2 per block" in out.stdout
    # 1/4 of every sharded matrix; the norms (8 KiB each in float32) whole
    assert "parameter bytes per rank: 6,739,214,336 of 26,953,662,464 (0.25)" in lines
    assert out.stderr == ""


def test_plan_all_shows_every_module_and_the_block_structures(cli):
    code, grouped, _ = cli("plan", "jamba", "--tiny")
    assert code == 0
    # Jamba mixes Mamba and attention layers, and MoE and dense feed-forwards: three structures
    assert [l for l in grouped.splitlines() if l.startswith("  x ")] == [
        "  x 2 layers: model.layers.0, 2", "  x 2 layers: model.layers.1, 3", "  x 1 layer: model.layers.4"]
    assert "model.layers.2." not in grouped and "model.layers.4.self_attn" in grouped
    code, every, _ = cli("plan", "jamba", "--tiny", "--all")
    assert code == 0 and "model.layers.2.mamba " in every and "  x " not in every
    assert "blocks: 2 layers: model.layers.0, 2" in every
    shown = {l.split()[0] for l in grouped.splitlines() if l.startswith(("model.", "lm_head"))}
    assert shown < {l.split()[0] for l in every.splitlines() if l.startswith(("model.", "lm_head"))}


def test_plan_json_holds_what_the_text_shows(cli):
    _, text, _ = cli("plan", "llama", "--tiny", "--keep", "nothing_matches")
    code, out, err = cli("plan", "llama", "--tiny", "--keep", "nothing_matches", "--json")
    data = json.loads(out)
    assert code == 0 and err == ""
    lines = text.splitlines()
    # the warning once, before the table, in both
    assert data["warnings"] == ["argument (linears only): pattern 'nothing_matches' matches no module"]
    assert [l for l in lines if "nothing_matches" in l] == [f"warning: {data['warnings'][0]}"]
    assert lines.index(f"warning: {data['warnings'][0]}") < next(i for i, l in enumerate(lines) if l.startswith("module "))
    rows = {l.split()[0]: l.split()[1:4] for l in lines if l.startswith(("model.", "lm_head"))}
    assert {m["module"]: [m["type"], m["style"], m["source"].split()[0]] for m in data["modules"]} == rows
    q_proj = next(m for m in data["modules"] if m["module"] == "model.layers.0.self_attn.q_proj")
    assert q_proj["parameters"] == [{"name": "weight", "shape": [64, 64], "per_rank": [32, 64], "uneven": None,
                                    "computes": None}]
    assert q_proj["block_group"] == 0 and data["block_groups"] == [
        {"layers": ["model.layers.0", "model.layers.1"], "count": 2}]
    b = data["parameter_bytes"]
    assert f"parameter bytes per rank: {b['per_rank']:,} of {b['unsharded']:,} (0.50)" in lines
    assert data["collectives"] == {"forward_per_block": 2, "backward_per_block": 2, "forward_outside": 2,
                                   "backward_outside": 1, "blocks": 2, "forward": 6, "backward": 5}


def test_plan_parameter_bytes_are_what_a_rank_holds(cli, pool2):
    _, out, _ = cli("plan", "llama", "--tiny", "--json")
    measured = tp.verify("llama", tp=2, pool=pool2)
    assert json.loads(out)["parameter_bytes"] == {"unsharded": measured.param_bytes_unsharded,
                                                  "per_rank": measured.param_bytes_per_rank}


def test_plan_reports_divisibility_problems_and_working_sizes():
    out = run("plan", "phi3", "--tp", "3", "--tiny")
    assert out.returncode == 1
    assert ("problem: model.layers.*.mlp.gate_up_proj.weight: each of 2 equal parts: 128 rows do not divide by "
            "tp=3") in out.stdout
    assert "TP sizes that divide every sharded size: 1, 2, 4, 8" in out.stdout


def test_plan_shows_environment_overrides():
    env = {**os.environ, "KEEP_LINEAR_ITEMS": "lm_head"}
    out = run("plan", "llama", "--tiny", env=env)
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if l.startswith("lm_head "))
    assert "keep" in line and "environment" in line


def test_plan_fix_overrides_keeps_the_whole_unit(cli):
    code, out, _ = cli("plan", "llama", "--keep", "k_proj")
    assert code == 1 and "keep the whole unit (self_attn.k_proj, self_attn.o_proj, self_attn.q_proj, self_attn.v_proj) " \
                         "or none of it (fix_overrides=True (--fix-overrides) keeps the whole unit)" in out
    code, out, _ = cli("plan", "llama", "--keep", "k_proj", "--fix-overrides")
    assert code == 0 and "problem:" not in out
    assert "warning: argument 'k_proj' keeps self_attn.k_proj whole, so its whole unit (self_attn.k_proj, " \
           "self_attn.o_proj, self_attn.q_proj, self_attn.v_proj) is kept whole in 32 blocks" in out
    q_proj = next(line for line in out.splitlines() if line.startswith("model.layers.0.self_attn.q_proj "))
    assert q_proj.split()[2:6] == ["keep", "argument,", "whole", "unit"]


def test_tp_1_is_a_no_op_with_no_collectives(cli):
    code, out, _ = cli("plan", "llama", "--tiny", "--tp", "1", "--json")
    data = json.loads(out)
    assert code == 0 and data["collectives"]["forward"] == data["collectives"]["backward"] == 0
    assert data["parameter_bytes"]["per_rank"] == data["parameter_bytes"]["unsharded"]
    code, out, _ = cli("verify", "llama", "--tp", "1", "--json")
    data = json.loads(out)
    assert code == 0, out
    assert (data["result"], data["forward_collectives"], data["expected_forward"], data["per_block_forward"],
            data["per_block_backward"]) == ("PASS", {}, 0, 0, 0)
    assert "report" not in data


def test_verify_prints_the_table_and_passes():
    out = run("verify", "llama", "--tp", "2", "--keep", "nothing_matches")
    assert out.returncode == 0, out.stdout + out.stderr
    # the warning once, before the table, not once per rank on stderr
    assert out.stdout.startswith("warning: argument (linears only): pattern 'nothing_matches' matches no module\n"
                                 "tp verify: family llama, tp=2\n")
    assert "nothing_matches" not in out.stderr and out.stdout.count("nothing_matches") == 1
    for needle in ("logits max abs diff", "worst gradient, relative", "forward collectives",
                   "parameter bytes per rank", "result: PASS"):
        assert needle in out.stdout
    assert re.search(r"collectives per block \(fwd / bwd\)\s+2 / 2", out.stdout), out.stdout


def test_verify_with_sequence_parallel_prints_gathers_scatters_and_activation_bytes():
    out = run("verify", "llama", "--tp", "2", "--sequence-parallel")
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"first block's forward\s+all_gather 2, reduce_scatter 2", out.stdout), out.stdout
    assert re.search(r"activation bytes per rank between blocks\s+8,192 of 16,384 \(0.50\)", out.stdout), out.stdout


def test_unknown_family_is_one_clear_line():
    out = run("plan", "lama")
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: no family 'lama' in the registry (did you mean llama?). Known families: ")
    assert "Traceback" not in out.stderr and len(out.stderr.splitlines()) == 1


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_tp_is_an_integer_of_at_least_1(cli, value):
    code, out, err = cli("plan", "llama", "--tp", value)
    assert (code, out) == (2, "")
    assert err == (f"error: argument --tp: expected an integer of at least 1 (the number of tensor-parallel ranks), "
                   f"got {value!r} (see `python -m tp plan --help`)\n")


def _directory(tmp_path):
    return tmp_path


def _not_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes("keep_linear_items = ['d\xe9j\xe0']\n".encode("latin-1"))
    return path


@pytest.mark.parametrize("variable, make, expected", [
    ("TP_CONFIG", _directory, "error: config file {path} is a directory"),
    ("TP_CONFIG", _not_utf8, "error: config file {path} is not UTF-8 text (byte 23)"),
    ("TP_REGISTRY", _directory, "error: registry file {path} is a directory"),
    ("TP_REGISTRY", _not_utf8, "error: registry file {path} is not UTF-8 text (byte 23)"),
])
def test_unreadable_config_or_registry_is_one_line_naming_the_file(cli, monkeypatch, tmp_path, variable, make,
                                                                   expected):
    path = make(tmp_path)
    monkeypatch.setenv(variable, str(path))
    for command in (("plan", "llama", "--tiny"), ("verify", "llama")):  # verify: before any process starts
        code, out, err = cli(*command)
        assert (code, out) == (2, "")
        assert err.startswith(expected.format(path=path.resolve() if variable == "TP_REGISTRY" else path))
        assert len(err.splitlines()) == 1


def test_a_directory_that_is_no_model_is_refused(cli, tmp_path):
    code, _, err = cli("plan", str(tmp_path))
    assert code == 2 and err.startswith(f"error: {tmp_path} is a directory but not a model transformers can read")


def test_version_names_the_distribution_and_its_dependencies(cli):
    from importlib import metadata

    code, out, _ = cli("--version")
    assert code == 0
    assert out.startswith("tp-dtensor ")
    assert f"torch {metadata.version('torch')}" in out and f"transformers {metadata.version('transformers')}" in out


def test_plan_and_verify_a_model_of_ones_own_with_a_user_registry(cli, tmp_path):
    """tests/toy.py stores its head count: the family's `divide` fixes it on each rank."""
    registry = tmp_path / "toy.toml"
    registry.write_text(TOY_REGISTRY)
    code, out, _ = cli("plan", "--model", "tests.toy:make_toy", "--registry", str(registry))
    assert code == 0 and out.startswith("tp plan: family toy, tp=2")
    assert "  x 2 layers: blocks.0-1" in out.splitlines()
    code, out, _ = cli("plan", "--model", "tests.toy:make_toy")  # no family: traced on the model
    assert code == 0 and "embed                Embedding     embedding    inferred (dataflow)" in out
    code, out, err = cli("verify", "--model", "tests.toy:make_toy", "--registry", str(registry), "--json")
    data = json.loads(out)
    assert code == 0, err
    assert (data["result"], data["family"], data["per_block_forward"]) == ("PASS", "toy", 2)


@pytest.mark.parametrize("args, expected", [
    (("plan", "--model", "tests.toy"), "error: --model 'tests.toy': expected PACKAGE.MODULE:FACTORY"),
    (("plan", "--model", "no_such_module:make"), "error: --model no_such_module:make: cannot import no_such_module"),
    (("plan", "--model", "tests.toy:ToyLMX"), "error: --model tests.toy:ToyLMX: tests.toy has no function 'ToyLMX'"),
    (("verify", "llama", "--model", "tests.toy:make_toy"), "error: give a family or model type ('llama') or --model"),
    (("plan",), "error: give a family, a model type, a model directory or --model"),
])
def test_model_mistakes_are_one_line(cli, args, expected):
    code, out, err = cli(*args)
    assert (code, out) == (2, "") and err.startswith(expected) and len(err.splitlines()) == 1
