"""Every example runs as its docstring says, with `python examples/NAME.py` (each starts its own
CPU processes), at its smallest size; fsdp_tp.py under torchrun with the wrong number of processes
says how many it needs."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_example(*args, launcher=(sys.executable,)):
    return subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=400, cwd=ROOT)


def _figures(pattern: str, text: str) -> list[float]:
    found = [float(x) for x in re.findall(pattern, text)]
    assert found, f"{pattern!r} not in:\n{text}"
    return found


def test_shard_llama_starts_its_own_ranks():
    out = run_example("examples/shard_llama.py")
    assert out.returncode == 0, out.stderr
    assert "tp plan: family llama, tp=2" in out.stdout
    assert _figures(r"logits max abs diff against the unsharded model: (\S+)", out.stdout)[0] <= 1e-5


def test_conv_block():
    out = run_example("examples/conv_block.py")
    assert out.returncode == 0, out.stderr
    params = [line for line in out.stdout.splitlines() if ".grad " in line]
    assert len(params) >= 4 and all(line.endswith("gathered param bit-exact)") for line in params), out.stdout
    assert max(_figures(r"max abs diff (\S+)", out.stdout)) <= 1e-5


def test_train_loss_parallel():
    out = run_example("examples/train_loss_parallel.py", "--steps", "2")
    assert out.returncode == 0, out.stderr
    steps = out.stdout.splitlines()[1:-1]  # "step  unsharded  sharded  rel. diff", one line per step
    assert [int(line.split()[0]) for line in steps] == [0, 1], out.stdout
    assert max(float(line.split()[-1]) for line in steps) <= 1e-5, out.stdout


def test_fsdp_tp_trains_like_the_unsharded_model():
    out = run_example("examples/fsdp_tp.py", "--steps", "1")
    assert out.returncode == 0, out.stderr
    assert _figures(r"rel diff (\S+)", out.stdout)[0] <= 1e-5
    assert _figures(r"dp=2 x tp=2, after 1 AdamW steps: parameters max abs diff (\S+)", out.stdout)[0] <= 1e-5


def test_fsdp_tp_with_the_wrong_process_count_says_it_needs_4():
    out = run_example("--nproc-per-node", "1", "examples/fsdp_tp.py",
                      launcher=(sys.executable, "-m", "torch.distributed.run"))
    assert out.returncode != 0
    assert ("error: examples/fsdp_tp.py needs 4 processes for dp=2 x tp=2 (or any multiple of 2 with at least 2 "
            "dp groups), got 1: torchrun --nproc-per-node 4 examples/fsdp_tp.py") in out.stderr
