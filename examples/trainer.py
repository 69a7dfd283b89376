"""Train a tensor-parallel model with transformers' Trainer (tp.trainer.Trainer) and compare every
step's loss with the unsharded model trained by transformers.Trainer.

    python examples/trainer.py                                  # unsharded here, then 2 CPU ranks under torchrun
    python examples/trainer.py --steps 3                        # fewer steps (default 10)
    torchrun --nproc-per-node 2 examples/trainer.py --use-cpu   # the sharded run alone, as you would launch yours

The script is an ordinary Trainer script: build the model, ``tp.apply`` it on a mesh of the launched
ranks, and use ``tp.trainer.Trainer`` where you would use ``transformers.Trainer``, with the same
arguments. The Trainer's defaults stay on: the fused AdamW, gradient clipping at ``max_grad_norm=1.0``,
the linear schedule. Two arguments matter for a sharded model: ``save_only_model=True`` (the Trainer
cannot checkpoint a sharded optimizer state yet; the model is saved whole by ``tp.save_pretrained``)
and, on CPU processes, ``use_cpu=True``. On GPUs: ``init_device_mesh("cuda", ...)`` and no ``use_cpu``.
The model is a tiny Llama built from its config (nothing is downloaded) with dropout off, so the two
runs can agree to float32 rounding.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing tp

import torch
import torch.distributed as dist
import transformers
from torch.distributed.device_mesh import init_device_mesh

import tp
import tp.trainer
from tp.testing.models import tiny_model


def dataset(vocab_size: int) -> list[dict]:
    """8 fixed sequences of 16 tokens: 2 batches of 4 per epoch, learnt within a few epochs."""
    ids = torch.randint(3, vocab_size, (8, 16), generator=torch.Generator().manual_seed(5))
    return [{"input_ids": row, "labels": row} for row in ids]


def train(steps: int, output_dir: str, *, sharded: bool, use_cpu: bool) -> list[dict]:
    """Train the tiny Llama for ``steps`` steps; the Trainer's log of each step (loss, grad_norm)."""
    model = tiny_model("llama")
    trainer_class = transformers.Trainer
    if sharded:
        device = "cpu" if use_cpu else "cuda"
        tp.apply(model.to(device), init_device_mesh(device, (dist.get_world_size(),)))
        trainer_class = tp.trainer.Trainer
    args = transformers.TrainingArguments(
        output_dir, max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1,
        save_only_model=True, use_cpu=use_cpu, seed=0, report_to="none", disable_tqdm=True)
    trainer = trainer_class(model=model, args=args, train_dataset=dataset(model.config.vocab_size))
    trainer.train()
    trainer.save_model()  # tp.save_pretrained for the sharded model: an ordinary checkpoint
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def report(reference: list[dict], sharded: list[dict]) -> str:
    lines = ["step  unsharded  tp=2       rel. diff  grad norm (unsharded, tp=2; clipped to 1.0)"]
    for step, (a, b) in enumerate(zip(reference, sharded)):
        lines.append(f"{step:4d}  {a['loss']:.6f}   {b['loss']:.6f}  {abs(a['loss'] - b['loss']) / a['loss']:.1e}"
                     f"    {a['grad_norm']:.6f}  {b['grad_norm']:.6f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="training steps (default 10)")
    parser.add_argument("--use-cpu", action="store_true", help="under torchrun: train on CPU processes (gloo)")
    parser.add_argument("--output-dir", default=os.path.join(tempfile.gettempdir(), "tp-example-trainer"),
                        help="under torchrun: the Trainer's output directory, the same on every rank (default %(default)s)")
    parser.add_argument("--write-losses", help=argparse.SUPPRESS)  # where rank 0 of the launched run writes its log
    args = parser.parse_args()
    if "LOCAL_RANK" in os.environ:  # under torchrun: the sharded run
        dist.init_process_group("gloo" if args.use_cpu else "nccl")
        if not args.use_cpu:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        log = train(args.steps, args.output_dir, sharded=True, use_cpu=args.use_cpu)
        if dist.get_rank() == 0:
            if args.write_losses:
                Path(args.write_losses).write_text(json.dumps(log))
            else:
                print(json.dumps(log))
        dist.barrier()  # no rank tears its groups down while another still talks to it
        dist.destroy_process_group()
        return
    with tempfile.TemporaryDirectory() as out:
        reference = train(args.steps, f"{out}/unsharded", sharded=False, use_cpu=True)
        log_file = Path(out) / "sharded.json"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        __file__, "--steps", str(args.steps), "--use-cpu", "--output-dir", f"{out}/sharded",
                        "--write-losses", str(log_file)], check=True)
        print(report(reference, json.loads(log_file.read_text())))


if __name__ == "__main__":
    main()
