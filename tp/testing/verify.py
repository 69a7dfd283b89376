"""tp.verify: shard a model on CPU processes and compare it with the unsharded one.

Every rank builds the same model, keeps an unsharded copy, shards the other with
``tp.apply``, runs one forward and backward on both, and compares logits, every
parameter's gradient and every gathered parameter. Collectives are counted with
``CommDebugMode`` and checked against what the plan says they should be.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..checks.compare import (
    GRAD_RTOL,
    LOGITS_ATOL,
    gradient_errors,
    logits_error,
    model_inputs,
)
from ..plan.structure import find_blocks
from ..sharding.gather import full_parameters
from .counter import CollectiveCounter
from .launch import WorkerPool


@dataclass(frozen=True)
class VerifySpec:
    family: str | None = None
    model_factory: Callable[[], nn.Module] | None = None
    config_overrides: dict[str, Any] = field(default_factory=dict)
    apply_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    batch: int = 2
    seq: int = 16


@dataclass
class VerifyResult:
    family: str | None
    tp: int
    logits_max_abs: float
    worst_grad_rel: float
    worst_grad_param: str
    gathered_exact: bool
    gathered_mismatch: list[str]
    forward_collectives: dict[str, int]
    backward_collectives: dict[str, int]
    expected_forward: int
    expected_backward: int
    per_block_forward: int
    per_block_backward: int
    blocks: int
    param_bytes_per_rank: int
    param_bytes_unsharded: int
    report: str
    warnings: list[str] = field(default_factory=list)  # the report's: units kept whole, and why
    activation_bytes_per_rank: int = 0
    activation_bytes_unsharded: int = 0
    first_block_forward: dict[str, int] = field(default_factory=dict)
    logits_atol: float = LOGITS_ATOL
    grad_rtol: float = GRAD_RTOL

    @property
    def collectives_ok(self) -> bool:
        return (sum(self.forward_collectives.values()) == self.expected_forward
                and sum(self.backward_collectives.values()) == self.expected_backward)

    @property
    def ok(self) -> bool:
        return (self.logits_max_abs <= self.logits_atol and self.worst_grad_rel <= self.grad_rtol
                and self.gathered_exact and self.collectives_ok)

    def table(self) -> str:
        def counts(c):
            return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none"

        def mark(good):
            return "ok" if good else "FAIL"

        rows = [
            ("check", "measured", "limit", ""),
            ("logits max abs diff", f"{self.logits_max_abs:.2e}", f"{self.logits_atol:.0e}",
             mark(self.logits_max_abs <= self.logits_atol)),
            ("worst gradient, relative", f"{self.worst_grad_rel:.2e} ({self.worst_grad_param})",
             f"{self.grad_rtol:.0e}", mark(self.worst_grad_rel <= self.grad_rtol)),
            ("gathered parameters == originals", "exact" if self.gathered_exact else
             f"{len(self.gathered_mismatch)} differ", "exact", mark(self.gathered_exact)),
            ("forward collectives", counts(self.forward_collectives), f"{self.expected_forward}",
             mark(sum(self.forward_collectives.values()) == self.expected_forward)),
            ("backward collectives", counts(self.backward_collectives), f"{self.expected_backward}",
             mark(sum(self.backward_collectives.values()) == self.expected_backward)),
            ("collectives per block (fwd / bwd)", f"{self.per_block_forward} / {self.per_block_backward}",
             f"x {self.blocks} blocks", ""),
            ("first block's forward", counts(self.first_block_forward), "", ""),
            ("parameter bytes per rank", f"{self.param_bytes_per_rank:,} of {self.param_bytes_unsharded:,} "
             f"({self.param_bytes_per_rank / self.param_bytes_unsharded:.2f})", "", ""),
            ("activation bytes per rank between blocks",
             f"{self.activation_bytes_per_rank:,} of {self.activation_bytes_unsharded:,} "
             f"({self.activation_bytes_per_rank / max(self.activation_bytes_unsharded, 1):.2f})", "", ""),
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"tp verify: family {self.family}, tp={self.tp}"]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
        lines.append("result: " + ("PASS" if self.ok else "FAIL"))
        return "\n".join(lines)


def _local_bytes(model: nn.Module) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        total += local.numel() * local.element_size()
    return total


def _block_output_bytes(model: nn.Module) -> tuple[list[int], list]:
    """Hooks that record, for every repeated block, the bytes this rank holds of its output."""
    from torch.distributed.tensor import DTensor

    sizes: list[int] = []

    def record(module, args, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        local = hidden.to_local() if isinstance(hidden, DTensor) else hidden
        sizes.append(local.numel() * local.element_size())

    handles = [model.get_submodule(b).register_forward_hook(record) for b in find_blocks(model)]
    return sizes, handles


@dataclass
class _BlockCounts:
    handles: list
    counts: dict[str, int] = field(default_factory=dict)


def _count_in_first_block(model: nn.Module, counter: CollectiveCounter) -> _BlockCounts:
    """The collectives, by kind, of the first repeated block's forward."""
    blocks = find_blocks(model)
    found = _BlockCounts([])
    if not blocks:
        return found
    block, before = model.get_submodule(blocks[0]), {}

    def start(module, args):
        before.update(counter.counts())

    def stop(module, args, output):
        found.counts = {k: n - before.get(k, 0) for k, n in counter.counts().items() if n - before.get(k, 0)}

    found.handles = [block.register_forward_pre_hook(start), block.register_forward_hook(stop)]
    return found


def verify_rank(spec: VerifySpec) -> dict:
    """One rank's part of ``tp.verify``: the fields of a VerifyResult (run on every rank of a pool)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from ..checks.compare import for_checking, token_ids
    from ..parallelize import apply
    from .models import registered_family, tiny_model

    world = dist.get_world_size()
    if spec.model_factory is not None:
        torch.manual_seed(spec.seed)
        reference = spec.model_factory()
    else:
        reference = tiny_model(spec.family, registry=spec.apply_kwargs.get("registry"), seed=spec.seed,
                               **spec.config_overrides)
    reference = for_checking(reference.float())
    model = copy.deepcopy(reference)
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    unsharded_bytes = _local_bytes(reference)

    mesh = init_device_mesh("cpu", (world,))
    family = registered_family(spec.family, spec.apply_kwargs.get("registry"))
    report = apply(model, mesh, family=family, **spec.apply_kwargs)

    gen = torch.Generator().manual_seed(spec.seed + 1)
    ids = token_ids(reference, (spec.batch, spec.seq), gen)
    inputs = model_inputs(reference, ids)

    ref_sizes, ref_hooks = _block_output_bytes(reference)
    ref_out = reference(**inputs)
    ref_out.loss.backward()
    sizes, hooks = _block_output_bytes(model)
    with CollectiveCounter() as fwd:
        first_block = _count_in_first_block(model, fwd)
        out = model(**inputs)
    for handle in (*ref_hooks, *hooks, *first_block.handles):
        handle.remove()
    with CollectiveCounter() as bwd:
        out.loss.backward()

    mismatched = [name for name, param in full_parameters(model).items() if not torch.equal(param, originals[name])]
    errors = gradient_errors(reference, model)
    worst_name = max(errors, key=errors.get, default="")
    c = report.collectives
    forward, backward = fwd.counts(), bwd.counts()
    return dict(
        family=report.family or f"{spec.family or 'custom model'} (plan inferred)", tp=world,
        logits_max_abs=logits_error(out.logits, ref_out.logits),
        worst_grad_rel=errors.get(worst_name, 0.0), worst_grad_param=worst_name,
        gathered_exact=not mismatched, gathered_mismatch=mismatched,
        forward_collectives=dict(forward), backward_collectives=dict(backward),
        expected_forward=c.forward, expected_backward=c.backward,
        per_block_forward=(sum(forward.values()) - c.forward_outside) // max(c.blocks, 1),
        per_block_backward=(sum(backward.values()) - c.backward_outside) // max(c.blocks, 1),
        blocks=c.blocks, param_bytes_per_rank=_local_bytes(model), param_bytes_unsharded=unsharded_bytes,
        first_block_forward=first_block.counts,
        report=str(report), warnings=list(report.warnings), activation_bytes_per_rank=sum(sizes), activation_bytes_unsharded=sum(ref_sizes),
    )


def verify(
    family: str | None = None,
    *,
    tp: int = 2,
    model_factory: Callable[[], nn.Module] | None = None,
    config_overrides: dict[str, Any] | None = None,
    pool: WorkerPool | None = None,
    seed: int = 0,
    **apply_kwargs,
) -> VerifyResult:
    """Shard a tiny model of ``family`` (a registry family, or any transformers model type, whose
    plan is then inferred), or ``model_factory()``, over ``tp`` CPU processes and
    compare it with the unsharded model. Returns a VerifyResult; ``result.ok`` says whether
    logits, gradients, gathered parameters and collective counts all passed.

    ``model_factory`` must be picklable (a module-level function), since every rank calls it.
    ``apply_kwargs`` go to ``tp.apply`` (allreduce, keep, config, registry, strict, ...).

    Example::
        >>> result = tp.verify("llama", tp=2)
        >>> print(result.table())
    """
    if family is None and model_factory is None:
        family = "llama"
    spec = VerifySpec(family, model_factory, dict(config_overrides or {}), apply_kwargs, seed)
    if pool is not None:
        results = pool.run(verify_rank, spec)
    else:
        with WorkerPool(tp) as own:
            results = own.run(verify_rank, spec)
    return VerifyResult(**results[0])
