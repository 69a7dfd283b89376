"""transformers' Trainer trains a model sharded by tp.apply (``tp.trainer.Trainer``) as it trains the
unsharded one: 10 steps at TP=2 on CPU processes, with its defaults for everything that matters here
(the fused AdamW, gradient clipping at ``max_grad_norm=1.0``, the linear schedule, shuffled batches).

Limits: every step's loss and its logged gradient norm (the norm before clipping, which clipping then
uses) within 1e-5 relative of the unsharded Trainer run's, the saved checkpoint within 1e-5 of the
unsharded run's. Dropout is off in both tiny models. The unsharded run is the pytest process itself
(one process, no distribution); the sharded run sees the environment torchrun gives its processes.
"""

import contextlib
import os

import pytest
import torch
import torch.distributed as dist

from tp.errors import PlanError
from tp.testing.models import tiny_model

STEPS, MAX_GRAD_NORM = 10, 1.0


def _dataset(vocab_size: int) -> list[dict]:
    """8 sequences, 2 batches of 4 per epoch: 10 steps see each 5 times, so the loss falls."""
    ids = torch.randint(3, vocab_size, (8, 16), generator=torch.Generator().manual_seed(5))
    return [{"input_ids": row, "labels": row} for row in ids]


@contextlib.contextmanager
def _as_under_torchrun():
    """The variables torchrun sets, from the pool's process group (accelerate reads them)."""
    launched = {"RANK": dist.get_rank(), "LOCAL_RANK": dist.get_rank(), "WORLD_SIZE": dist.get_world_size(),
                "LOCAL_WORLD_SIZE": dist.get_world_size(), "OMP_NUM_THREADS": 1}
    before = {name: os.environ.get(name) for name in launched}
    os.environ.update({name: str(value) for name, value in launched.items()})
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


def _train(family: str, output_dir: str, sharded: bool) -> dict:
    """Train ``family``'s tiny model with the Trainer (tp.trainer's on a TP mesh of every rank when
    ``sharded``), save it into ``output_dir``; the logged losses and gradient norms."""
    import transformers
    from torch.distributed.device_mesh import init_device_mesh

    import tp
    import tp.trainer

    model = tiny_model(family)
    trainer_class = transformers.Trainer
    with _as_under_torchrun() if sharded else contextlib.nullcontext():
        if sharded:
            tp.apply(model, init_device_mesh("cpu", (dist.get_world_size(),)))
            trainer_class = tp.trainer.Trainer
        args = transformers.TrainingArguments(
            output_dir, max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-3,
            max_grad_norm=MAX_GRAD_NORM, adam_epsilon=1e-6, logging_steps=1, save_only_model=True, use_cpu=True, seed=0,
            report_to="none", disable_tqdm=True)
        trainer = trainer_class(model=model, args=args, train_dataset=_dataset(model.config.vocab_size))
        trainer.train()
        trainer.save_model()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    return {"loss": [entry["loss"] for entry in logs], "grad_norm": [entry["grad_norm"] for entry in logs],
            "optimizer": f"{type(optimizer).__name__}(fused={optimizer.defaults.get('fused')})"}


def _close(a: list[float], b: list[float], rtol: float = 1e-5) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rtol * abs(x) for x, y in zip(a, b))


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_trainer_trains_a_sharded_model_as_the_unsharded_one(pool2, tmp_path, family):
    from safetensors.torch import load_file

    reference = _train(family, str(tmp_path / "unsharded"), sharded=False)
    sharded = pool2.run(_train, family, str(tmp_path / "sharded"), sharded=True)

    assert reference["optimizer"] == "AdamW(fused=True)"  # the Trainer's default on torch >= 2.8
    assert len(reference["loss"]) == STEPS and reference["loss"][-1] < reference["loss"][0] - 0.05, reference
    # clipping acted at every step: the norm it scales down from exceeds max_grad_norm
    assert min(reference["grad_norm"]) > MAX_GRAD_NORM, reference["grad_norm"]
    for rank in sharded:
        assert rank["optimizer"] == reference["optimizer"]
        assert _close(reference["loss"], rank["loss"]), (reference["loss"], rank["loss"])
        assert _close(reference["grad_norm"], rank["grad_norm"]), (reference["grad_norm"], rank["grad_norm"])

    expected = load_file(tmp_path / "unsharded" / "model.safetensors")
    saved = load_file(tmp_path / "sharded" / "model.safetensors")  # written by tp.save_pretrained, whole
    assert saved.keys() == expected.keys()
    worst = max((saved[name] - tensor).abs().max().item() for name, tensor in expected.items())
    assert worst <= 1e-5, worst


def test_an_unsharded_model_is_sent_to_transformers_trainer():
    from tp.trainer import tensor_parallel_mesh

    with pytest.raises(PlanError, match="call tp.apply"):
        tensor_parallel_mesh(tiny_model("llama"))


@pytest.mark.slow  # a launcher, torchrun and 2 ranks, each importing torch and transformers: ~1 min on 2 busy cores
def test_the_example_runs_as_its_docstring_says():
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([sys.executable, "examples/trainer.py", "--steps", "2"], capture_output=True, text=True,
                         timeout=400, cwd=Path(__file__).resolve().parents[1], check=False)
    assert out.returncode == 0, out.stderr
    table = out.stdout.splitlines()[-3:]  # the header, then one line per step: step, losses, rel. diff, norms
    assert table[0].startswith("step  unsharded"), out.stdout
    assert [int(line.split()[0]) for line in table[1:]] == [0, 1], out.stdout
    assert all(float(line.split()[3]) <= 1e-5 for line in table[1:]), out.stdout
