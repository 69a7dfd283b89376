"""The command line as a user runs it, in fresh processes."""

import re
import subprocess
import sys


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "tp", *args], capture_output=True, text=True, timeout=300, env=env)


def test_plan_is_a_dry_run_with_shapes_sources_and_collectives():
    out = run("plan", "llama", "--tp", "4")
    assert out.returncode == 0, out.stderr
    q_proj = next(l for l in out.stdout.splitlines() if l.startswith("model.layers.31.self_attn.q_proj "))
    # the full-size default config, not the tiny one
    assert q_proj.split()[1:5] == ["Linear", "colwise", "family", "llama"]
    assert q_proj.endswith("weight [4096, 4096] -> [1024, 4096]")
    assert "forward 2 per block x 32 blocks" in out.stdout and "backward 2 per block" in out.stdout


def test_plan_reports_divisibility_problems_and_working_sizes():
    out = run("plan", "llama", "--tp", "3", "--tiny")
    assert out.returncode == 1
    assert ("problem: model.layers.*.self_attn.k_proj.weight: kv heads: 4 heads of 8 rows do not divide by tp=3 "
            "nor does tp divide by it (to replicate them)") in out.stdout
    assert "TP sizes that divide every sharded size: 1, 2, 4" in out.stdout


def test_plan_shows_environment_overrides(monkeypatch):
    import os

    env = {**os.environ, "KEEP_LINEAR_ITEMS": "lm_head"}
    out = run("plan", "llama", "--tiny", env=env)
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if l.startswith("lm_head "))
    assert "keep" in line and "environment" in line


def test_verify_prints_the_table_and_passes():
    out = run("verify", "llama", "--tp", "2")
    assert out.returncode == 0, out.stdout + out.stderr
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
    assert "Traceback" not in out.stderr
