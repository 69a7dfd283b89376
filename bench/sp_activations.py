"""Activation bytes between decoder blocks: tp's sequence parallelism against transformers' built-in TP.

    python bench/sp_activations.py            # 2 CPU ranks (gloo), started by the script itself
    python bench/sp_activations.py --no-grad  # the same forward under torch.no_grad()

A small random Llama (hidden 256, 4 layers, 8 heads, 4 kv heads, vocab 1024, float32) is saved
with ``save_pretrained`` to a temporary directory and loaded on each of 2 ranks. For every
variant one forward runs on a batch of 2 x 128 tokens and the script records:

- activation bytes per rank between blocks: forward hooks on ``model.model.layers[i]`` add up
  the bytes this rank holds of each block's output (the residual stream); a DTensor counts its
  ``to_local()`` bytes, a plain tensor all of its bytes (summed over the blocks, largest rank);
- the ratio to the unsharded model;
- the logits' max abs difference from the unsharded model's (gathered where sharded);
- the collectives of that forward (``tp.comm.CollectiveCounter``, a ``CommDebugMode``).

Variants:

- ``unsharded``: ``from_pretrained(dir)`` on every rank.
- ``tp.apply``: ``tp.apply(model, mesh)``, and with ``sequence_parallel=True``.
- ``transformers TP``: ``from_pretrained(dir, distributed_config=DistributedConfig(tp_size=2))``,
  the non-deprecated spelling of ``tp_plan="auto"`` (that one reads the TP size from
  ``WORLD_SIZE``, which ``tp.launch.WorkerPool`` does not set).
- ``+ enable_sequence_parallel``: the same with ``DistributedConfig(enable_sequence_parallel=True)``,
  the flag transformers offers (documented as "Reserved for sequence parallelism. Not wired up
  yet.").
- ``+ "sequence_parallel" norms``: the same with the plan's ``"sequence_parallel"`` style put on
  every norm (``layers.*.input_layernorm``, ``layers.*.post_attention_layernorm``, ``norm``),
  the only other switch transformers has; no model's built-in plan uses that style.

A variant that fails is shown with its error instead of figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tp.testing.launch import WorkerPool

WORLD = 2
CONFIG = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
          "num_key_value_heads": 4, "vocab_size": 1024, "max_position_embeddings": 256}
BATCH, SEQ, SEED = 2, 128, 0

# transformers' own switch for its "sequence_parallel" style: put it on the norms.
HF_SP_NORMS = {
    "model.layers.*.input_layernorm": "sequence_parallel",
    "model.layers.*.post_attention_layernorm": "sequence_parallel",
    "model.norm": "sequence_parallel",
}

VARIANTS = [
    ("unsharded", "unsharded"),
    ("tp_apply", "tp.apply"),
    ("tp_apply_sp", "tp.apply(sequence_parallel=True)"),
    ("hf_tp", "transformers TP (tp_plan auto)"),
    ("hf_tp_enable_sp", "transformers TP + enable_sequence_parallel"),
    ("hf_tp_sp_norms", "transformers TP + \"sequence_parallel\" norms"),
]


def save_checkpoint(path: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    model.save_pretrained(path)


def _input_ids() -> torch.Tensor:
    gen = torch.Generator().manual_seed(SEED + 1)
    return torch.randint(3, CONFIG["vocab_size"], (BATCH, SEQ), generator=gen)


def _load(path: str, variant: str):
    """The model of ``variant`` on this rank, sharded or not."""
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM, DistributedConfig

    import tp

    if variant.startswith("hf_"):
        extra = {}
        if variant == "hf_tp_enable_sp":
            extra["enable_sequence_parallel"] = True
        if variant == "hf_tp_sp_norms":
            extra["tp_plan"] = HF_SP_NORMS  # merged over the model's plan
        config = DistributedConfig(tp_size=WORLD, **extra)
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, distributed_config=config)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if variant.startswith("tp_apply"):
        tp.apply(model, init_device_mesh("cpu", (WORLD,)), sequence_parallel=variant == "tp_apply_sp")
    return model


def _forward(model, ids: torch.Tensor, grad: bool):
    """Logits (gathered if sharded) and the bytes this rank holds of every block's output."""
    from torch.distributed.tensor import DTensor

    from tp.sharding.gather import full_tensor

    sizes: list[int] = []

    def record(module, args, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        local = hidden.to_local() if isinstance(hidden, DTensor) else hidden
        sizes.append(local.numel() * local.element_size())

    handles = [layer.register_forward_hook(record) for layer in model.model.layers]
    with torch.set_grad_enabled(grad):
        logits = model(input_ids=ids).logits
    for handle in handles:
        handle.remove()
    return full_tensor(logits).detach(), sum(sizes)


def measure_rank(path: str, variant: str, grad: bool) -> dict:
    """One variant on this rank: activation bytes, logits max diff, forward collectives."""
    from transformers.utils import logging as hf_logging

    from tp.testing.counter import CollectiveCounter

    hf_logging.disable_progress_bar()

    ids = _input_ids()
    reference, _ = _forward(_load(path, "unsharded"), ids, grad)
    try:
        model = _load(path, variant)
        _forward(model, ids, grad)  # warm-up: transformers hooks some parameters on the first forward
        with CollectiveCounter() as counter:
            logits, act_bytes = _forward(model, ids, grad)
    except Exception as e:  # noqa: BLE001 -- reported in the table
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    plan = dict(getattr(model, "tp_plan", {}) or {}) if variant.startswith("hf_") else {}
    return {"act_bytes": act_bytes, "max_diff": (logits - reference).abs().max().item(),
            "collectives": dict(counter.counts()), "plan": plan}


def _fmt_counts(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-grad", action="store_true", help="run the forwards under torch.no_grad()")
    args = parser.parse_args()
    grad = not args.no_grad
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # inherited by the ranks

    import transformers

    results = {}
    with tempfile.TemporaryDirectory() as path, WorkerPool(WORLD) as pool:
        save_checkpoint(path)
        for key, _ in VARIANTS:
            results[key] = pool.run(measure_rank, path, key, grad)

    base = max(r["act_bytes"] for r in results["unsharded"])
    rows = [("variant", "act bytes/rank", "ratio", "logits max diff", "forward collectives")]
    errors = []
    for key, label in VARIANTS:
        ranks = results[key]
        failed = next((r for r in ranks if "error" in r), None)
        if failed:
            rows.append((label, "-", "-", "-", "FAILED (below)"))
            errors.append((label, failed))
            continue
        act = max(r["act_bytes"] for r in ranks)
        diff = max(r["max_diff"] for r in ranks)
        rows.append((label, f"{act:,}", f"{act / base:.2f}", f"{diff:.1e}", _fmt_counts(ranks[0]["collectives"])))

    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"llama hidden {CONFIG['hidden_size']}, {CONFIG['num_hidden_layers']} layers, "
          f"{CONFIG['num_attention_heads']} heads / {CONFIG['num_key_value_heads']} kv, vocab "
          f"{CONFIG['vocab_size']}, batch {BATCH} x seq {SEQ}, float32; {WORLD} CPU ranks (gloo); "
          f"forward {'with' if grad else 'without'} grad; torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    for label, failed in errors:
        print(f"\n{label} failed: {failed['error']}")
    hf = results["hf_tp_sp_norms"][0] if "error" not in results["hf_tp_sp_norms"][0] else results["hf_tp"][0]
    if "plan" in hf:
        print("\ntransformers' resolved llama plan (the variant with the \"sequence_parallel\" norms):")
        for name, style in hf["plan"].items():
            print(f"  {name}: {style}")


if __name__ == "__main__":
    main()
