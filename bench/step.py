"""Forward and forward+backward time at TP=2: tp against transformers' built-in TP and the unsharded model.

    python bench/step.py                        # batch 2 x seq 256, 2 warm-up + 10 timed rounds
    python bench/step.py --batch 1 --iters 10   # other sizes

One random Llama of about 100M parameters (hidden 768, 12 layers, 12 heads, intermediate 2048,
vocab 32000, untied lm_head, float32) is saved with ``save_pretrained`` to a temporary directory
and every variant loads those same weights:

- ``unsharded, 1 thread`` and ``unsharded, 2 threads``: ``from_pretrained(dir)`` in one process;
  2 threads use both cores, as the two TP ranks do.
- ``tp.apply``: ``from_pretrained(dir)`` then ``tp.apply(model, mesh)`` on 2 CPU ranks (gloo, one
  thread each).
- ``tp.from_pretrained``: ``tp.from_pretrained(dir, mesh)`` (parameters read straight into shards).
- ``transformers TP``: ``from_pretrained(dir, distributed_config=DistributedConfig(tp_size=2))``.

Every variant is loaded once in its own processes (a ``tp.launch.WorkerPool``; the pools wait
idle while another runs). An iteration is a forward under ``torch.no_grad()`` (inference), then a
training step: forward with ``labels`` and ``loss.backward()`` (gradients cleared outside the
timed region). The script runs ``--warmup`` then ``--iters`` rounds of one iteration of every
variant, in an order that rotates from round to round, so that the machine's slower and faster
stretches (a shared 2-core VM drifts by 10-20%) fall on every variant alike. A TP iteration's
time is the slowest rank's; the table shows the median over the timed rounds, and each variant's
ratio to transformers' TP and to the unsharded model on 1 thread. The logits (every 16th position) and the
loss are compared with the unsharded model's (max abs difference), which shows every variant
computes the same thing.

One more, untimed, training step counts the collectives of each TP variant, split into forward
and backward, and attributed to a decoder layer or to the rest of the model (embedding, final
norm, lm_head): hooks on the decoder layers say where the forward is, and gradient hooks on the
layers' outputs say where the backward is. ``CommDebugMode`` records the shapes of DTensor
operands only, not the collectives' buffers, so this script's ``CommDebugMode`` subclass adds up
the bytes of the plain tensors every collective gets and returns (the larger of the two: the full
buffer of an all-gather, the input of a reduce-scatter, the tensor of an all-reduce).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tp.testing.counter import CollectiveCounter, short_name
from tp.testing.launch import WorkerPool

WORLD = 2
CONFIG = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
          "num_key_value_heads": 12, "vocab_size": 32000, "max_position_embeddings": 512,
          "tie_word_embeddings": False}
SEED = 0

VARIANTS = [  # key, label, processes, threads per process
    ("unsharded_1", "unsharded, 1 thread", 1, 1),
    ("unsharded_2", "unsharded, 2 threads", 1, 2),
    ("tp_apply", "tp.apply", WORLD, 1),
    ("tp_from_pretrained", "tp.from_pretrained", WORLD, 1),
    ("hf_tp", "transformers TP", WORLD, 1),
]
LABELS = {key: label for key, label, *_ in VARIANTS}
TP_VARIANTS = ("tp_apply", "tp_from_pretrained", "hf_tp")


class CollectiveTrace(CollectiveCounter):
    """CollectiveCounter that also records, per (phase, place, collective), the count and the bytes.

    ``phase`` ("forward" / "backward") and ``place`` (a layer index or "rest") are set from outside.
    """

    def __init__(self):
        super().__init__()
        from torch.distributed.tensor.debug._comm_mode import c10d_collective_ops

        self._collectives = self.comm_registry | set(c10d_collective_ops)
        self.phase, self.place = "forward", "rest"
        self.records = defaultdict(lambda: [0, 0])  # (phase, place, name) -> [count, bytes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        packet = getattr(func, "_overloadpacket", None)
        if out is not NotImplemented and packet in self._collectives:
            record = self.records[(self.phase, self.place, short_name(packet))]
            record[0] += 1
            # the largest buffer: an all-gather's output list counts once, not again with its input
            record[1] += max(*(_tensor_bytes(arg) for arg in args), _tensor_bytes(out))
        return out


def _tensor_bytes(tree) -> int:
    from torch.utils._pytree import tree_leaves

    return sum(t.numel() * t.element_size() for t in tree_leaves(tree) if isinstance(t, torch.Tensor))


def save_checkpoint(path: str) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def _load(path: str, variant: str):
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM, DistributedConfig

    import tp

    if variant == "hf_tp":
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                    distributed_config=DistributedConfig(tp_size=WORLD))
    if variant == "tp_from_pretrained":
        return tp.from_pretrained(path, init_device_mesh("cpu", (WORLD,)), progress=False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if variant == "tp_apply":
        tp.apply(model, init_device_mesh("cpu", (WORLD,)))
    return model


def _timed(fn) -> float:
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _trace_step(model, ids) -> dict:
    """One training step under CollectiveTrace, with the layer hooks; the records as a plain dict."""
    layers = model.model.layers
    trace = CollectiveTrace()
    handles = []

    def enter(i):
        def hook(module, args, kwargs):
            trace.place = i
            if i == 0:  # the gradient of the first layer's input is ready: the backward left the layers
                hidden = args[0] if args else kwargs["hidden_states"]
                hidden.register_hook(lambda grad: setattr(trace, "place", "rest"))
        return hook

    def leave(i):
        def hook(module, args, output):
            trace.place = "rest"
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            # fires when the gradient of this layer's output is ready: the backward enters the layer
            hidden.register_hook(lambda grad: setattr(trace, "place", i))
        return hook

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(enter(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(leave(i)))
    model.zero_grad(set_to_none=True)
    with trace:
        loss = model(input_ids=ids, labels=ids).loss
        trace.phase, trace.place = "backward", "rest"
        loss.backward()
    for handle in handles:
        handle.remove()
    return {key: tuple(value) for key, value in trace.records.items()}


_STATE: dict = {}  # this worker's model and inputs, between the tasks below


def setup(path: str, variant: str, threads: int, batch: int, seq: int) -> None:
    """Load ``variant`` in this worker and keep it for ``iteration`` and ``finish``."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(SEED + 1)
    _STATE.update(model=_load(path, variant), ids=torch.randint(3, CONFIG["vocab_size"], (batch, seq), generator=gen))


def iteration() -> dict:
    """One timed inference forward and one timed training step on this rank: seconds, and the loss."""
    model, ids = _STATE["model"], _STATE["ids"]

    def forward():
        with torch.no_grad():
            _STATE["logits"] = model(input_ids=ids).logits

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        _STATE["loss"] = loss.item()

    seconds = {"forward": _timed(forward)}
    model.zero_grad(set_to_none=True)
    seconds["step"] = _timed(step)
    return {"seconds": seconds, "loss": _STATE["loss"]}


def finish() -> dict:
    """The last forward's logits (every 16th position, rank 0), the last loss, and for TP the
    collectives of one more training step."""
    import torch.distributed as dist

    trace = _trace_step(_STATE["model"], _STATE["ids"]) if dist.get_world_size() > 1 else {}
    sample = _STATE["logits"][:, ::16].clone() if dist.get_rank() == 0 else None
    return {"logits": sample, "loss": _STATE["loss"], "trace": trace}


def _median(rounds: list[list[dict]], kind: str) -> float:
    """Median over the timed rounds of the slowest rank's time."""
    return statistics.median(max(rank["seconds"][kind] for rank in ranks) for ranks in rounds)


def _collective_table(trace: dict, layers: int) -> tuple[list[tuple], bool]:
    """Rows: per layer (layer 0, after checking every layer has the same), rest, whole model."""
    def summary(phase, places):
        out = defaultdict(lambda: [0, 0])
        for (ph, place, name), (count, nbytes) in trace.items():
            if ph == phase and place in places:
                out[name][0] += count
                out[name][1] += nbytes
        return dict(out)

    same = all(summary(ph, {i}) == summary(ph, {0}) for ph in ("forward", "backward") for i in range(layers))
    rows = []
    for label, places in (("per layer", {0}), ("rest", {"rest"}), ("whole model", set(range(layers)) | {"rest"})):
        cells = []
        for phase in ("forward", "backward"):
            s = summary(phase, places)
            count = sum(c for c, _ in s.values())
            nbytes = sum(b for _, b in s.values())
            detail = ", ".join(f"{name} {c}" for name, (c, _) in sorted(s.items())) or "none"
            cells += [str(count), f"{nbytes / 2**20:.1f}", detail]
        rows.append((label, *cells))
    return rows, same


def _print_table(rows: list[tuple]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # inherited by the ranks
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    import transformers

    pools = {key: WorkerPool(world) for key, _, world, _ in VARIANTS}
    rounds = {key: [] for key in pools}
    try:
        with tempfile.TemporaryDirectory() as path:
            n_params = save_checkpoint(path)
            for key, _, _, threads in VARIANTS:
                pools[key].run(setup, path, key, threads, args.batch, args.seq)
        # one iteration of every variant per round, in an order that rotates: a slower or faster
        # stretch of the machine falls on every variant alike
        for i in range(args.warmup + args.iters):
            order = list(pools)[i % len(pools):] + list(pools)[:i % len(pools)]
            for key in order:
                ranks = pools[key].run(iteration)
                if i >= args.warmup:
                    rounds[key].append(ranks)
        results = {key: pool.run(finish) for key, pool in pools.items()}
    finally:
        for pool in pools.values():
            pool.close()

    print(f"llama hidden {CONFIG['hidden_size']}, {CONFIG['num_hidden_layers']} layers, "
          f"{CONFIG['num_attention_heads']} heads, intermediate {CONFIG['intermediate_size']}, vocab "
          f"{CONFIG['vocab_size']}: {n_params / 1e6:.0f}M parameters, float32; batch {args.batch} x seq {args.seq}; "
          f"median of {args.iters} rounds after {args.warmup} warm-up; {WORLD} CPU ranks (gloo); "
          f"torch {torch.__version__}, transformers {transformers.__version__}\n")

    times = {key: {kind: _median(rounds[key], kind) for kind in ("forward", "step")} for key, *_ in VARIANTS}
    reference_loss = results["unsharded_1"][0]["loss"]
    reference_logits = results["unsharded_1"][0]["logits"]
    rows = [("variant", "procs x threads", "no-grad fwd ms", "fwd+bwd ms", "fwd / hf TP", "fwd+bwd / hf TP",
             "fwd / unsharded 1t", "fwd+bwd / unsharded 1t", "logits diff", "loss diff")]
    for key, label, world, threads in VARIANTS:
        t, hf, one = times[key], times["hf_tp"], times["unsharded_1"]
        diff = max(abs(r["loss"] - reference_loss) for r in results[key])
        logits_diff = (results[key][0]["logits"] - reference_logits).abs().max().item()
        rows.append((label, f"{world} x {threads}", f"{t['forward'] * 1e3:.0f}", f"{t['step'] * 1e3:.0f}",
                     f"{t['forward'] / hf['forward']:.2f}", f"{t['step'] / hf['step']:.2f}",
                     f"{t['forward'] / one['forward']:.2f}", f"{t['step'] / one['step']:.2f}", f"{logits_diff:.1e}",
                     f"{diff:.1e}"))
    _print_table(rows)

    layers = CONFIG["num_hidden_layers"]
    backward = {}
    for key, label, *_ in VARIANTS:
        if key not in TP_VARIANTS:
            continue
        trace = results[key][0]["trace"]
        table, same = _collective_table(trace, layers)
        backward[key] = int(table[0][4])
        print(f"\n{label}: collectives of one training step, rank 0 (MiB: bytes of the collectives' buffers)"
              f"{'' if same else '  -- WARNING: the layers differ, per layer shows layer 0'}")
        _print_table([("", "fwd n", "fwd MiB", "forward", "bwd n", "bwd MiB", "backward"), *table])

    print()
    for key in ("tp_apply", "tp_from_pretrained"):
        t, hf = times[key], times["hf_tp"]
        print(f"{LABELS[key]} / transformers TP: forward {t['forward'] / hf['forward']:.2f}, fwd+bwd "
              f"{t['step'] / hf['step']:.2f}; backward collectives per layer {backward[key]} vs {backward['hf_tp']}")


if __name__ == "__main__":
    main()
