"""Loading a checkpoint at TP=2: ``tp.from_pretrained`` against transformers' built-in TP loading.

    python bench/load.py                   # random Llama of about 1e9 parameters, float32 (~4 GB)
    python bench/load.py --small           # about 1e8 parameters: a quick run
    python bench/load.py --params 5e8 --dtype bfloat16 --dir /tmp/llama-500m   # keep / reuse it
    python bench/load.py --moe --params 3e8 --dtype bfloat16   # a Mixtral-style MoE checkpoint

The script writes a random Llama checkpoint (safetensors, shards of at most 1 GB) from a
separate process: ``LlamaForCausalLM(config)`` then ``save_pretrained``, one copy of the
weights in memory. With ``--moe`` it writes a Mixtral instead (8 experts, 2 per token), which
transformers' ``save_pretrained`` stores as published Mixtral checkpoints are: one tensor per
expert (``block_sparse_moe.experts.0.w1.weight``, ...), which both loaders convert into the
packed ``experts.gate_up_proj`` / ``experts.down_proj`` on load. Then it loads that checkpoint once per variant, each variant in its own
freshly started processes (a new ``tp.launch.WorkerPool``), so that one variant's peak memory
never shows in another's:

- ``tp.from_pretrained``: ``tp.from_pretrained(dir, mesh)`` on 2 CPU ranks (gloo): the model is
  built on the meta device, sharded, and each rank reads only its own rows.
- ``transformers TP``: ``AutoModelForCausalLM.from_pretrained(dir,
  distributed_config=DistributedConfig(tp_size=2))`` on 2 CPU ranks (the non-deprecated spelling
  of ``tp_plan="auto"``, which reads its size from ``WORLD_SIZE``).
- ``unsharded`` (context, ``--no-unsharded`` skips it): ``AutoModelForCausalLM.from_pretrained(dir)``
  in one process.

For every rank it records (the table shows the rank whose load added most):

- ``load s``: wall time of the load call (largest rank); ``touch s``: of the touch (below), which
  is where a lazily mapped checkpoint is actually read;
- ``weights``: bytes of the parameters this rank holds (its shards, plus what is replicated);
- ``RSS before``: resident memory just before the call (everything imported, process group up);
- ``added at load``: peak resident memory right after the call (``getrusage(RUSAGE_SELF).ru_maxrss``,
  Linux's VmHWM) minus ``RSS before``;
- ``added, touched``: the same after every parameter has been read once (``param.sum()``).
  A parameter can be a view of the memory-mapped checkpoint, which the kernel reads (and counts
  as resident) only when it is first used; this column compares loaded,
  usable models (safetensors' ``get_slice`` returns views of the mapping, and both loaders keep
  some of them as parameters). ``/ checkpoint`` is this column over the checkpoint's size on disk;
- ``peak RSS``: the absolute peak after the touch;
- ``anon +``, ``file +``: how much the anonymous and the file-backed resident memory grew from
  before the call to after the touch (``/proc/self/status``; pages of a memory-mapped checkpoint
  are file-backed: they are the page cache, shared by every process that maps the file, and the
  kernel can drop them under pressure, but they count in each process's RSS).

Then every variant runs one forward on the same 1 x 16 tokens and its logits are compared with
``tp.from_pretrained``'s (max abs difference), which shows both TP loads read the right rows.
The checkpoint was just written, so it is read from the page cache: load times are not disk
times, unless ``--cold`` asks the kernel to drop the checkpoint's cached pages
(``posix_fadvise(DONTNEED)``) before every variant.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tp.testing.launch import WorkerPool

WORLD = 2
SEED = 0
VOCAB = 32000
# (hidden, intermediate, heads, kv heads): TinyLlama's shape for large models, a GPT-2-small-like
# width for small ones; the number of layers is chosen to reach the requested parameter count.
SHAPES = [(5e8, (2048, 5632, 32, 4)), (0, (768, 2048, 12, 4))]
TARGET = 0.55  # peak RSS a rank adds, over the checkpoint's size: its half, plus a little
EXPERTS, EXPERTS_PER_TOKEN = 8, 2  # Mixtral's; each expert's intermediate size is a SHAPES row's over 2

VARIANTS = [
    ("tp", "tp.from_pretrained", WORLD),
    ("hf_tp", "transformers TP", WORLD),
    ("unsharded", "unsharded (1 process)", 1),
]


def model_config(params: float, moe: bool) -> dict:
    """The config of a Llama (or, with ``moe``, a Mixtral) of about ``params`` parameters."""
    hidden, inter, heads, kv = next(shape for floor, shape in SHAPES if params >= floor)
    head_dim = hidden // heads
    experts = {"num_local_experts": EXPERTS, "num_experts_per_tok": EXPERTS_PER_TOKEN} if moe else {}
    if moe:
        inter //= 2
    mlp = 3 * hidden * inter * EXPERTS + EXPERTS * hidden if moe else 3 * hidden * inter  # + the router
    per_layer = hidden * (2 * hidden + 2 * kv * head_dim) + mlp + 2 * hidden
    outside = 2 * VOCAB * hidden + hidden  # embedding, lm_head (untied), final norm
    layers = max(1, round((params - outside) / per_layer))
    return {"model_type": "mixtral" if moe else "llama", "hidden_size": hidden, "intermediate_size": inter,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
            "vocab_size": VOCAB, "max_position_embeddings": 2048, "tie_word_embeddings": False, **experts}


def write_checkpoint(path: str, config: dict, dtype: str) -> int:
    """Run in its own process: a random model written with save_pretrained; its parameter count."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(SEED)
    config = AutoConfig.for_model(**config, dtype=dtype)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    model.save_pretrained(path, max_shard_size="1GB")
    return sum(p.numel() for p in model.parameters())


def checkpoint_stats(path: str) -> tuple[int, int, int]:
    """(bytes on disk, parameters, files) of the safetensors files in ``path``, from their headers."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    params = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                params += torch.Size(f.get_slice(name).get_shape()).numel()
    return sum(f.stat().st_size for f in files), params, len(files)


def drop_cached(path: str) -> None:
    """Ask the kernel to forget the cached pages of the checkpoint's files (no other file is touched)."""
    for file in Path(path).glob("*.safetensors"):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _rss_kib() -> dict:
    """Current resident memory, and its anonymous and file-backed parts, in KiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def _input_ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(SEED + 1))


def load_rank(path: str, variant: str, dtype: str) -> dict:
    """Load the checkpoint as ``variant`` on this rank; memory, time and the logits of one forward."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM, DistributedConfig
    from transformers.utils import logging as hf_logging

    import tp

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    dtype = getattr(torch, dtype)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),)) if variant == "tp" else None
    dist.barrier()
    before_all = _rss_kib()
    before = before_all["VmRSS"]
    start = time.perf_counter()
    if variant == "tp":
        model = tp.from_pretrained(path, mesh, dtype=dtype, progress=False)
    elif variant == "hf_tp":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                     distributed_config=DistributedConfig(tp_size=WORLD))
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    seconds = time.perf_counter() - start
    at_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    # a parameter may be a view of the memory-mapped file (safetensors' get_slice returns views),
    # read from disk only when first used: touch every parameter once, so that loads compare usable
    weights, start = 0, time.perf_counter()
    for param in model.parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        local.detach().sum()
        weights += local.numel() * local.element_size()
    touch_seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    after = _rss_kib()
    dist.barrier()
    with torch.no_grad():
        logits = tp.full_tensor(model.eval()(input_ids=_input_ids()).logits)
    return {"seconds": seconds, "touch_seconds": touch_seconds, "before": before * 1024, "at_load": (at_load - before) * 1024,
            "peak": peak * 1024, "added": (peak - before) * 1024, "weights": weights,
            "anon": (after["RssAnon"] - before_all["RssAnon"]) * 1024,
            "file": (after["RssFile"] - before_all["RssFile"]) * 1024,
            "logits": logits.float() if dist.get_rank() == 0 else None}


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=1e9, help="parameter count to aim at (default 1e9)")
    parser.add_argument("--small", action="store_true", help="same as --params 1e8")
    parser.add_argument("--moe", action="store_true", help=f"a Mixtral-style checkpoint ({EXPERTS} experts, "
                                                           "one tensor per expert) instead of a Llama")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype of the checkpoint and of the loaded models")
    parser.add_argument("--dir", help="checkpoint directory to write and keep; reused if it holds a checkpoint "
                                      "(default: a temporary directory, removed at the end)")
    parser.add_argument("--cold", action="store_true", help="drop the checkpoint from the page cache before "
                                                                "every variant")
    parser.add_argument("--no-unsharded", action="store_true", help="skip the one-process unsharded load")
    args = parser.parse_args()
    params = 1e8 if args.small else args.params
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # inherited by the ranks

    import transformers

    config = model_config(params, args.moe)
    path = args.dir or tempfile.mkdtemp(prefix="tp-bench-load-", dir="/tmp")
    try:
        if not (Path(path) / "config.json").is_file():
            start = time.perf_counter()
            # a process of its own: the parent stays small while the ranks load
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
                ex.submit(write_checkpoint, path, config, args.dtype).result()
            print(f"wrote {path} in {time.perf_counter() - start:.0f} s")
        stored = json.loads((Path(path) / "config.json").read_text())
        size, n_params, n_files = checkpoint_stats(path)
        variants = [v for v in VARIANTS if not (args.no_unsharded and v[0] == "unsharded")]
        results = {}
        for key, _, world in variants:
            if args.cold:
                drop_cached(path)
            with WorkerPool(world) as pool:  # fresh processes for every variant
                results[key] = pool.run(load_rank, path, key, args.dtype)
    finally:
        if not args.dir:
            shutil.rmtree(path, ignore_errors=True)

    experts = (f" x {stored['num_local_experts']} experts ({stored['num_experts_per_tok']} per token)"
               if "num_local_experts" in stored else "")
    print(f"{stored['model_type']} hidden {stored['hidden_size']}, {stored['num_hidden_layers']} layers, "
          f"{stored['num_attention_heads']} heads / {stored['num_key_value_heads']} kv, intermediate "
          f"{stored['intermediate_size']}{experts}, vocab {stored['vocab_size']}: {n_params / 1e9:.3f} B parameters, "
          f"{args.dtype}; checkpoint {size / 1e9:.2f} GB ({_gib(size)} GiB) in "
          f"{n_files} safetensors file(s)")
    print(f"{WORLD} CPU ranks (gloo), 1 thread each; {'cold' if args.cold else 'warm'} page cache; torch {torch.__version__}, transformers "
          f"{transformers.__version__}; memory in GiB, the largest rank\n")
    reference = results[variants[0][0]][0]["logits"]
    rows = [("variant", "load s", "touch s", "weights", "RSS before", "added at load", "added, touched", "/ checkpoint",
             "peak RSS", "anon +", "file +", "logits vs tp")]
    for key, label, _ in variants:
        ranks = results[key]
        worst = max(ranks, key=lambda r: r["added"])
        diff = (ranks[0]["logits"] - reference).abs().max().item()
        rows.append((label, f"{max(r['seconds'] for r in ranks):.1f}",
                     f"{max(r['touch_seconds'] for r in ranks):.1f}", _gib(worst["weights"]), _gib(worst["before"]),
                     _gib(worst["at_load"]), _gib(worst["added"]), f"{worst['added'] / size:.2f}",
                     _gib(worst["peak"]), _gib(worst["anon"]), _gib(worst["file"]),
                     "-" if key == "tp" else f"{diff:.1e}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())

    ours, theirs = results["tp"], results["hf_tp"]
    added = max(r["added"] for r in ours), max(r["added"] for r in theirs)
    seconds = [max(r["seconds"] for r in ranks) for ranks in (ours, theirs)]
    usable = [max(r["seconds"] + r["touch_seconds"] for r in ranks) for ranks in (ours, theirs)]
    print(f"\ntp.from_pretrained / transformers TP: peak RSS added (touched) {added[0] / added[1]:.2f}, "
          f"load time {seconds[0] / seconds[1]:.2f}, load + touch time {usable[0] / usable[1]:.2f}")
    print(f"target peak RSS added per rank <= {TARGET} x checkpoint: {added[0] / size:.2f} -> "
          f"{'met' if added[0] <= TARGET * size else 'NOT met'}; below transformers': "
          f"{'yes' if added[0] < added[1] else 'NO'}")


if __name__ == "__main__":
    main()
