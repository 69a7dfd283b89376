"""Decoding and prefill at TP=2: tp against transformers' built-in TP, the unsharded model and the limit.

    python bench/decode.py                        # 32 decode steps, 1 warm-up + 10 timed rounds
    python bench/decode.py --small                # a quick run: 8 decode steps, prefill of 128, 2 rounds
    python bench/decode.py --tokens 64 --rounds 5 --prefill 512
    python bench/decode.py --profile              # where a decode step's time goes: tp.apply and transformers' TP

One random Llama of 56M parameters (hidden 512, 8 layers, 8 heads / 4 kv heads, intermediate
1376, vocab 32000, untied lm_head, float32; the model of issue 15) is saved with
``save_pretrained`` to a temporary directory, and every variant but the rank's share loads those
same weights (the loaders are bench/step.py's):

- ``unsharded, 1 thread`` and ``unsharded, 2 threads``: ``from_pretrained(dir)`` in one process;
  2 threads use both cores, as the two TP ranks do.
- ``one rank's share, 1 thread``: the same Llama cut to what one rank computes at TP=2 (4 heads /
  2 kv heads, intermediate 688, vocabulary 16000; the residual stream whole), random weights, in
  one process: the time a rank's compute takes with all its per-call overhead, none of it halved.
- ``tp.apply``: ``from_pretrained(dir)`` then ``tp.apply(model, mesh)`` on 2 CPU ranks (gloo, one
  thread each).
- ``tp.from_pretrained``: ``tp.from_pretrained(dir, mesh)`` (parameters read straight into shards).
- ``transformers TP``: ``from_pretrained(dir, distributed_config=DistributedConfig(tp_size=2))``.

Every variant is loaded once in its own processes (a ``tp.launch.WorkerPool``; the pools wait idle
while another runs). An iteration of a variant measures, in this order:

- ``decode b1 ms/token``: greedy ``generate()`` with the KV cache (transformers' own loop, a
  ``DynamicCache``) of ``--tokens`` + 1 new tokens after a prompt of ``--prompt`` random tokens,
  batch 1. A logits processor stamps the time each time a token's logits are ready; the first
  stamp ends the prefill of the prompt, and the column is (last stamp - first stamp) / ``--tokens``:
  the time of one decode step (a forward of one token per sequence against the cache, the argmax,
  generate's own bookkeeping), with the prompt's prefill left out.
- ``decode b8 ms/token``: the same with a batch of 8 prompts: the time of one step, which makes a
  token for each of the 8 sequences.
- ``prefill ms``: one forward of 1 x ``--prefill`` tokens (512 by default) under ``no_grad``, with
  ``logits_to_keep=1`` as ``generate()`` runs its prefill (only the last position's logits).

The script runs ``--warmup`` then ``--rounds`` rounds of one iteration of every variant, in an
order that rotates from round to round, so that the machine's slower and faster stretches fall on
every variant alike and the ratios come from one run. A TP variant's time is its slowest rank's;
the table shows the median over the timed rounds. The closing lines also give, for each tp
variant, the lowest and highest of its per-round ratios to transformers' TP: their spread is the
noise of the run.

``limit`` is not a model but the time TP=2 could reach if sharding added nothing but its
collectives: the unsharded model's time on 1 thread / 2, plus the time of the collectives one
decode step (or the prefill) of ``tp.apply`` runs. Those collectives are recorded once, before the
rounds, with ``CommDebugMode`` (``tp.testing.counter``): a decode step's are those of
``generate()`` of 2 new tokens less those of ``generate()`` of 1, so anything generate itself
communicates per token counts too; the prefill's are those of its forward. Each round then replays
every distinct recorded collective (kind and buffer size, e.g. an all-reduce of one token's hidden
state, the all-gather of its logits) alone on plain tensors in the ``tp.apply`` ranks, 20 times
after a barrier, and takes the median; its time is the median over the rounds. The collectives
section lists them with their measured latencies. The limit halves the whole unsharded time, the
per-call overhead of a forward (Python, dispatch, generate's bookkeeping) included, which no
sharding divides; ``one rank's share + collectives`` (one rank's share's time plus the same
collectives) is the limit with that overhead left whole.

Columns: ``procs x threads``; the three times above; ``/ hf TP``: each time over transformers
TP's; ``/ limit``: each time over the limit's; ``tokens`` (``-`` for the rank's share, whose random
weights make other tokens): ``same`` when every round's generated
tokens, at batch 1 and 8, equal those of the unsharded model on 1 thread (the script stops with an
error naming the variant, batch, row and position when they do not); ``prefill logits diff``: max
abs difference of the prefill's last-position logits from the unsharded model's (rank 0, last
round; the script stops with an error above 1e-4).

``--profile`` instead runs ``cProfile`` over a greedy ``generate()`` of 16 tokens at batch 1 on
rank 0 of tp.apply and of transformers' TP (after 4 tokens of warm-up), one after the other, and
prints each one's time per token under the profiler, the shares of gloo's ``wait`` and
``allreduce`` and of ``F.linear``, and its top functions by own time.

On a shared 2-core machine the absolute times drift by 10-20% from minute to minute (and more when
other programs run); read the ratios, and not differences under about 0.1.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

# bench/step.py (beside this file): the same variants, loaded the same way
from step import _load, _print_table

from tp.testing.counter import CollectiveCounter, short_name
from tp.testing.launch import WorkerPool

WORLD = 2
CONFIG = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8,
          "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048,
          "tie_word_embeddings": False}
SEED = 0
BATCHES = (1, 8)
REPLAYS = 20  # timed repetitions of each collective per round
LOGITS_TOLERANCE = 1e-4  # prefill logits, max abs difference from the unsharded model's (float32)

VARIANTS = [  # key, label, processes, threads per process
    ("unsharded_1", "unsharded, 1 thread", 1, 1),
    ("unsharded_2", "unsharded, 2 threads", 1, 2),
    ("rank_share", "one rank's share, 1 thread", 1, 1),
    ("tp_apply", "tp.apply", WORLD, 1),
    ("tp_from_pretrained", "tp.from_pretrained", WORLD, 1),
    ("hf_tp", "transformers TP", WORLD, 1),
]
TP_VARIANTS = ("tp_apply", "tp_from_pretrained", "hf_tp")
CHECKED = ("unsharded_1", "unsharded_2", *TP_VARIANTS)  # the variants whose tokens and logits must match


def share_config() -> dict:
    """The unsharded model cut to one rank's share at TP=2: half the heads, kv heads,
    intermediate features and vocabulary (the residual stream stays whole)."""
    return {**CONFIG, **{key: CONFIG[key] // WORLD for key in
                         ("num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size")},
            "head_dim": CONFIG["hidden_size"] // CONFIG["num_attention_heads"]}
MEASURES = [f"decode_b{b}" for b in BATCHES] + ["prefill"]


# c10d's tensor forms of the collectives, under the names the replay knows them by
_SAME_AS = {"_allgather_base_": "all_gather", "_reduce_scatter_base_": "reduce_scatter"}


class CollectiveLog(CollectiveCounter):
    """CollectiveCounter that also lists every collective as (name, bytes of its buffer, dtype).

    The buffer is the whole tensor the collective works on: the tensor of an all-reduce, the
    gathered output of an all-gather, the input of a reduce-scatter. It is the largest of the
    collective's arguments and its result, an argument that is a list of tensors counting as their
    sum (c10d's ``allgather_`` takes a list of outputs)."""

    def __init__(self):
        super().__init__()
        from torch.distributed.tensor.debug._comm_mode import c10d_collective_ops

        self._collectives = self.comm_registry | set(c10d_collective_ops)
        self.log: list[tuple[str, int, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        packet = getattr(func, "_overloadpacket", None)
        if out is not NotImplemented and packet in self._collectives:
            from torch.utils._pytree import tree_leaves

            parts = [[t for t in tree_leaves(part) if isinstance(t, torch.Tensor)] for part in (*args, out)]
            buffer = max((p for p in parts if p), key=lambda p: sum(t.numel() * t.element_size() for t in p))
            name = short_name(packet)
            self.log.append((_SAME_AS.get(name, name), sum(t.numel() * t.element_size() for t in buffer),
                             str(buffer[0].dtype).removeprefix("torch.")))
        return out


def save_checkpoint(path: str) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


_STATE: dict = {}  # this worker's model and inputs, between the tasks below


def setup(path: str, variant: str, threads: int, prompt: int, prefill: int) -> None:
    """Load ``variant`` in this worker and make the inputs every variant shares."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(SEED + 1)
    prompts = {b: torch.randint(3, CONFIG["vocab_size"], (b, prompt), generator=gen) for b in BATCHES}
    prefill_ids = torch.randint(3, CONFIG["vocab_size"], (1, prefill), generator=gen)
    if variant == "rank_share":  # random weights: only its time counts
        from transformers import LlamaConfig, LlamaForCausalLM

        vocab = share_config()["vocab_size"]
        model = LlamaForCausalLM(LlamaConfig(**share_config()))
        prompts, prefill_ids = {b: ids % vocab for b, ids in prompts.items()}, prefill_ids % vocab
    else:
        model = _load(path, variant)
    _STATE.update(model=model.eval(), prompts=prompts, prefill_ids=prefill_ids)


def _generate(prompt: torch.Tensor, new_tokens: int) -> tuple[list[float], torch.Tensor]:
    """Greedy generate() of ``new_tokens``: the times at which each token's logits were ready, and
    the new tokens."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    out = _STATE["model"].generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                   do_sample=False, eos_token_id=None, pad_token_id=0,
                                   logits_processor=LogitsProcessorList([Stamp()]))
    if out.shape[1] != prompt.shape[1] + new_tokens or len(stamps) != new_tokens:
        raise RuntimeError(f"generate() made {out.shape[1] - prompt.shape[1]} tokens in {len(stamps)} steps, "
                           f"not {new_tokens}")
    return stamps, out[:, prompt.shape[1]:]


def _prefill() -> torch.Tensor:
    with torch.no_grad():
        return _STATE["model"](input_ids=_STATE["prefill_ids"], logits_to_keep=1).logits


def iteration(tokens: int) -> dict:
    """One iteration on this rank: seconds per decode step at each batch and of the prefill, the
    generated tokens, and (rank 0) the prefill's last logits."""
    import torch.distributed as dist

    seconds, generated = {}, {}
    for b in BATCHES:
        dist.barrier()
        stamps, new = _generate(_STATE["prompts"][b], tokens + 1)
        seconds[f"decode_b{b}"] = (stamps[-1] - stamps[0]) / tokens
        generated[b] = new.tolist()
    dist.barrier()
    start = time.perf_counter()
    logits = _prefill()
    seconds["prefill"] = time.perf_counter() - start
    return {"seconds": seconds, "tokens": generated,
            "logits": logits[:, -1].clone() if dist.get_rank() == 0 else None}


PROFILED_TOKENS = 16
_HOT = {"wait": "{built-in method torch._C._distributed_c10d.wait}",
        "allreduce": "{built-in method torch._C._distributed_c10d.allreduce}",
        "F.linear": "{built-in method torch._C._nn.linear}"}


def profile_decode() -> dict:
    """cProfile of a greedy generate() of PROFILED_TOKENS tokens at batch 1 on this rank."""
    import cProfile
    import io
    import pstats

    prompt = _STATE["prompts"][1]
    _generate(prompt, 4)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    _generate(prompt, PROFILED_TOKENS)
    profiler.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(profiler)
    own = {pstats.func_std_string(func): row[2] for func, row in stats.stats.items()}
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(12)
    return {"wall": wall, "total": stats.total_tt, "shares": {k: own.get(name, 0.0) for k, name in _HOT.items()},
            "top": text.getvalue()}


def _profile(path: str, prompt: int, prefill: int) -> None:
    for key, label, world, threads in VARIANTS:
        if key not in ("tp_apply", "hf_tp"):
            continue
        with WorkerPool(world) as pool:
            pool.run(setup, path, key, threads, prompt, prefill)
            result = pool.run(profile_decode)[0]
        total = result["total"]
        shares = ", ".join(f"{name} {seconds:.3f} s ({seconds / total:.0%})" for name, seconds in result["shares"].items())
        print(f"{label}: {result['wall'] * 1e3 / PROFILED_TOKENS:.1f} ms per token under cProfile; of {total:.3f} s "
              f"profiled: {shares}")
        print("\n".join(line for line in result["top"].splitlines() if line.strip()) + "\n")


def record_collectives() -> dict[str, list]:
    """The collectives of one decode step at each batch and of the prefill, on this rank."""
    def logged(fn) -> Counter:
        with CollectiveLog() as log:
            fn()
        return Counter(log.log)

    records = {}
    for b in BATCHES:
        prompt = _STATE["prompts"][b]
        step = logged(functools.partial(_generate, prompt, 2)) - logged(functools.partial(_generate, prompt, 1))
        records[f"decode_b{b}"] = sorted(step.items())
    records["prefill"] = sorted(logged(_prefill).items())
    return records


def collective_latency(collectives: list[tuple[str, int, str]]) -> dict:
    """Seconds of each collective (name, bytes, dtype) run alone on plain tensors: the median of
    ``REPLAYS`` runs, each started after a barrier."""
    import torch.distributed as dist

    world = dist.get_world_size()
    seconds = {}
    for name, nbytes, dtype in collectives:
        dtype_ = getattr(torch, dtype)
        numel = nbytes // torch.empty((), dtype=dtype_).element_size()
        if name == "all_reduce":
            buffer = torch.zeros(numel, dtype=dtype_)
            run = functools.partial(dist.all_reduce, buffer)
        elif name == "all_gather":
            full, part = torch.empty(numel, dtype=dtype_), torch.zeros(numel // world, dtype=dtype_)
            run = functools.partial(dist.all_gather_single, full, part)
        elif name == "reduce_scatter":
            full, part = torch.zeros(numel, dtype=dtype_), torch.empty(numel // world, dtype=dtype_)
            run = functools.partial(dist.reduce_scatter_single, part, full)
        else:
            raise RuntimeError(f"the limit cannot replay a {name}: add it to collective_latency")
        times = []
        for _ in range(REPLAYS + 2):  # two untimed
            dist.barrier()
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        seconds[(name, nbytes, dtype)] = statistics.median(times[2:])
    return seconds


def _check_tokens(rounds: dict, reference: dict) -> None:
    """Stop with the first difference from the unsharded model's tokens: variant, batch, row, position."""
    for key, label, *_ in VARIANTS:
        if key not in CHECKED:
            continue
        for i, ranks in enumerate(rounds[key]):
            for rank, result in enumerate(ranks):
                for b in BATCHES:
                    for row, (got, want) in enumerate(zip(result["tokens"][b], reference[b])):
                        if got != want:
                            pos = next(p for p, (g, w) in enumerate(zip(got, want)) if g != w)
                            sys.exit(f"error: {label} (rank {rank}, round {i}) generated different tokens from the "
                                     f"unsharded model at batch {b}, row {row}, new token {pos}: "
                                     f"{got[pos:pos + 4]} vs {want[pos:pos + 4]}")


def _slowest(ranks: list[dict], measure: str) -> float:
    """A round's time of one variant: its slowest rank's."""
    return max(r["seconds"][measure] for r in ranks)


def _kinds(records: list) -> str:
    """'all_gather 1, all_reduce 17' from [((name, bytes, dtype), count), ...]."""
    counts = Counter()
    for (name, *_), n in records:
        counts[name] += n
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items())) or "none"


def _check_prefill(rounds: dict, reference: torch.Tensor) -> None:
    """Stop when a variant's last prefill logits differ from the unsharded model's by more than the tolerance."""
    for key, label, *_ in VARIANTS:
        if key not in CHECKED:
            continue
        diff = (rounds[key][-1][0]["logits"] - reference).abs().max().item()
        if diff > LOGITS_TOLERANCE:
            sys.exit(f"error: {label}'s prefill logits differ from the unsharded model's by {diff:.1e} "
                     f"(tolerance {LOGITS_TOLERANCE:.0e})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, help="decode steps timed per generate() (default 32)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt length for decoding (default 32)")
    parser.add_argument("--prefill", type=int, help="tokens of the prefill forward (default 512)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, help="timed rounds (default 10)")
    parser.add_argument("--profile", action="store_true", help="profile a decode at batch 1 of tp.apply and "
                                                               "transformers' TP instead of timing rounds")
    parser.add_argument("--small", action="store_true", help="a quick run: defaults --tokens 8 --prefill 128 "
                                                             "--rounds 2 instead")
    args = parser.parse_args()
    for name, default, small in (("tokens", 32, 8), ("prefill", 512, 128), ("rounds", 10, 2)):
        if getattr(args, name) is None:
            setattr(args, name, small if args.small else default)
    if args.tokens < 1 or args.rounds < 1:
        parser.error("--tokens and --rounds must be at least 1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # inherited by the ranks
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    import transformers

    if args.profile:
        with tempfile.TemporaryDirectory() as path:
            save_checkpoint(path)
            _profile(path, args.prompt, args.prefill)
        return
    pools = {key: WorkerPool(world) for key, _, world, _ in VARIANTS}
    rounds = {key: [] for key in pools}
    latencies = []  # per round: {(name, bytes, dtype): seconds}, the slowest rank's
    try:
        with tempfile.TemporaryDirectory() as path:
            n_params = save_checkpoint(path)
            for key, _, _, threads in VARIANTS:
                pools[key].run(setup, path, key, threads, args.prompt, args.prefill)
        collectives = {key: pools[key].run(record_collectives)[0] for key in TP_VARIANTS}
        replayed = sorted({c for records in collectives["tp_apply"].values() for c, _ in records})
        for i in range(args.warmup + args.rounds):
            order = list(pools)[i % len(pools):] + list(pools)[:i % len(pools)]
            for key in order:
                ranks = pools[key].run(iteration, args.tokens)
                if i >= args.warmup:
                    rounds[key].append(ranks)
            ranks = pools["tp_apply"].run(collective_latency, replayed)
            if i >= args.warmup:
                latencies.append({c: max(r[c] for r in ranks) for c in replayed})
    finally:
        for pool in pools.values():
            pool.close()

    reference = rounds["unsharded_1"][0][0]
    _check_tokens(rounds, reference["tokens"])
    _check_prefill(rounds, reference["logits"])
    variety = ", ".join(f"{len({t for row in reference['tokens'][b] for t in row})} distinct of "
                        f"{b * (args.tokens + 1)} at batch {b}" for b in BATCHES)

    print(f"llama hidden {CONFIG['hidden_size']}, {CONFIG['num_hidden_layers']} layers, "
          f"{CONFIG['num_attention_heads']} heads / {CONFIG['num_key_value_heads']} kv, intermediate "
          f"{CONFIG['intermediate_size']}, vocab {CONFIG['vocab_size']}: {n_params / 1e6:.0f}M parameters, float32; "
          f"greedy generate() with the KV cache, prompt {args.prompt}, {args.tokens} decode steps timed, "
          f"batch {' and '.join(map(str, BATCHES))} (the unsharded model's new tokens: {variety}); "
          f"prefill 1 x {args.prefill}; median of {args.rounds} rounds after {args.warmup} warm-up; "
          f"{WORLD} CPU ranks (gloo), 1 thread each; torch {torch.__version__}, "
          f"transformers {transformers.__version__}\n")

    times = {key: {m: statistics.median(_slowest(ranks, m) for ranks in rounds[key]) for m in MEASURES}
             for key in pools}
    latency = {c: statistics.median(round_[c] for round_ in latencies) for c in replayed}
    comm = {m: sum(n * latency[c] for c, n in collectives["tp_apply"][m]) for m in MEASURES}
    times["limit"] = {m: times["unsharded_1"][m] / WORLD + comm[m] for m in MEASURES}
    times["share_limit"] = {m: times["rank_share"][m] + comm[m] for m in MEASURES}

    labels = [(key, label, f"{world} x {threads}") for key, label, world, threads in VARIANTS]
    rows = [("variant", "procs x threads", "decode b1 ms/token", "decode b8 ms/token", "prefill ms",
             *(f"{m} / hf TP" for m in ("b1", "b8", "prefill")), *(f"{m} / limit" for m in ("b1", "b8", "prefill")),
             "tokens", "prefill logits diff")]
    for key, label, shape in [*labels, ("limit", "limit (computed)", "-"),
                              ("share_limit", "one rank's share + collectives", "-")]:
        t = times[key]
        checked = key in CHECKED
        diff = f"{(rounds[key][-1][0]['logits'] - reference['logits']).abs().max():.1e}" if checked else "-"
        rows.append((label, shape, *(f"{t[m] * 1e3:.1f}" for m in MEASURES),
                     *(f"{t[m] / times['hf_tp'][m]:.2f}" for m in MEASURES),
                     *(f"{t[m] / times['limit'][m]:.2f}" for m in MEASURES),
                     "same" if checked else "-", diff))
    _print_table(rows)

    print(f"\nlimit = unsharded 1 thread / {WORLD} + the collectives of tp.apply, each replayed alone "
          f"(median of {REPLAYS} runs per round, median over the rounds):")
    for m in MEASURES:
        parts = ", ".join(f"{n} {name} of {nbytes / 1024:g} KiB x {latency[(name, nbytes, dtype)] * 1e3:.3f} ms"
                          for (name, nbytes, dtype), n in collectives["tp_apply"][m])
        print(f"  {m}: {times['unsharded_1'][m] * 1e3:.1f} / {WORLD} + {comm[m] * 1e3:.1f} ms ({parts})")
    print(f"one rank's share + collectives = the time of one rank's share of the model, run alone (its per-call "
          f"overhead does not halve), plus the same collectives: " + ", ".join(
              f"{m} {times['rank_share'][m] * 1e3:.1f} + {comm[m] * 1e3:.1f} ms" for m in MEASURES))
    print("\ncollectives per decode step and per prefill (CommDebugMode, rank 0):")
    _print_table([("variant", *MEASURES)] + [(label, *(_kinds(collectives[key][m]) for m in MEASURES))
                                             for key, label, *_ in VARIANTS if key in TP_VARIANTS])

    print()
    for key, label in (("tp_apply", "tp.apply"), ("tp_from_pretrained", "tp.from_pretrained")):
        t = times[key]
        ratios = {m: (t[m] / times["hf_tp"][m], t[m] / times["limit"][m]) for m in MEASURES}
        print(f"{label}: / transformers TP " + ", ".join(f"{m} {hf:.2f}" for m, (hf, _) in ratios.items())
              + "; / limit " + ", ".join(f"{m} {lim:.2f}" for m, (_, lim) in ratios.items())
              + "; / one rank's share + collectives " + ", ".join(
                  f"{m} {t[m] / times['share_limit'][m]:.2f}" for m in MEASURES))
        # the same ratio within each round (both variants ran minutes apart at most): its spread shows the noise
        spread = {m: [_slowest(ours, m) / _slowest(theirs, m) for ours, theirs in zip(rounds[key], rounds["hf_tp"])]
                  for m in MEASURES}
        print("  / transformers TP, lowest and highest round: "
              + ", ".join(f"{m} {min(r):.2f}-{max(r):.2f}" for m, r in spread.items()))
        decode = [m for m in MEASURES if m.startswith("decode")]
        met = all(ratios[m][0] <= 0.8 and ratios[m][1] <= 1.3 for m in decode)
        print(f"  target decode <= 0.8 x transformers TP and <= 1.3 x limit: {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
