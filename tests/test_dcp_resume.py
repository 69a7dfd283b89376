"""A training run saved with tp.dcp (model and AdamW state) resumes at another mesh shape and goes
on as if never interrupted.

The uninterrupted run trains on a (dp, tp) = (2, 2) mesh (FSDP2 over tp.apply), saving after
its third step. A model built with other weights on a (1, 4) mesh loads that checkpoint, trains 5 steps,
saves; one on a (4, 1) mesh loads that and trains 5 more. Every step's loss (the global batch's
mean: each dp rank trains on its rows) matches the uninterrupted run's within 1e-6 relative, so
the weights and the optimizer's moments came back in place (without the moments, phi3's second
step after resuming is off by 3e-4). The same without FSDP, TP 2 -> TP 4, through the user's own
dcp.save / dcp.load on tp.dcp.TrainingState.
torch's own get_state_dict saved with dcp.save at TP 2 loads at TP 4 with dcp.load and
set_state_dict alone, phi3's fused weights included (stored one DTensor per part).
"""

import functools

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import tp
from tp.testing import torch_dcp
from tp.testing.models import tiny_model

ROWS, SEQ, LR, EPS, MAX_NORM = 4, 8, 1e-3, 1e-6, 1.0  # ROWS: the global batch, split over dp ranks
SAVED_AT, RESUMED = 2, 5
RTOL = 1e-6


def _batches(vocab: int, steps: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (ROWS, SEQ), generator=gen) for _ in range(steps)]


def _blocks(model) -> list[torch.nn.Module]:
    names = set(model._no_split_modules)
    return [m for m in model.modules() if type(m).__name__ in names]


def _save(model, opt, path: str, own_dcp_calls: bool) -> None:
    if own_dcp_calls:  # the user's own torch.distributed.checkpoint calls, on tp's Stateful
        dcp.save({"train": tp.dcp.TrainingState(model, opt)}, checkpoint_id=path)
    else:
        tp.dcp.save(model, path, optimizer=opt)


def _load(model, opt, path: str, own_dcp_calls: bool) -> None:
    if own_dcp_calls:
        dcp.load({"train": tp.dcp.TrainingState(model, opt)}, checkpoint_id=path)
    else:
        tp.dcp.load(model, path, optimizer=opt)


def _run(family: str, overrides: dict, shape: tuple[int, int], fsdp: bool, steps: range,
         load_from: str | None = None, save_to: str | None = None, save_after: int | None = None,
         own_dcp_calls: bool = False) -> list[float]:
    """Train ``steps`` (indices into the batches) on a (dp, tp) mesh, after loading ``load_from``;
    save to ``save_to`` after step ``save_after``. Returns each step's loss over the global batch."""
    dp_size, tp_size = shape
    if fsdp:
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("dp", "tp"))
        tp_mesh, dp_mesh = mesh["tp"], mesh["dp"]
    else:
        assert dp_size == 1
        tp_mesh, dp_mesh = init_device_mesh("cpu", (tp_size,), mesh_dim_names=("tp",)), None
    # the resumed runs start from other weights, which the load must overwrite
    model = tiny_model(family, seed=0 if load_from is None else 123, **overrides)
    tp.apply(model, tp_mesh, trial=False)  # the plan's trial is not what this tests
    if fsdp:
        for block in _blocks(model):
            fully_shard(block, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS, foreach=True)
    if load_from is not None:
        _load(model, opt, load_from, own_dcp_calls)
    dp_rank = dp_mesh.get_local_rank() if fsdp else 0
    batches = _batches(model.config.vocab_size, steps.stop)
    losses = []
    for step in steps:
        mine = batches[step].chunk(dp_size)[dp_rank]
        loss = model(input_ids=mine, labels=mine).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
        opt.zero_grad()
        total = loss.detach().clone()
        if fsdp:
            dist.all_reduce(total, group=dp_mesh.get_group())
        losses.append(total.item() / dp_size)
        if step == save_after:
            _save(model, opt, save_to, own_dcp_calls)
    return losses


def _assert_continues(resumed: list[float], uninterrupted: list[float], what: str) -> None:
    assert len(resumed) == len(uninterrupted) == RESUMED
    for step, (ours, ref) in enumerate(zip(resumed, uninterrupted, strict=True)):
        assert abs(ours - ref) <= RTOL * abs(ref), f"{what}, step {step + 1} after resuming: {ours:.9f}, uninterrupted {ref:.9f}"


def _resume_across_meshes(pool4, tmp_path, family: str, overrides: dict) -> None:
    first, second = str(tmp_path / "at_2x2"), str(tmp_path / "at_1x4")
    after_save = SAVED_AT + 1
    total = range(after_save + 2 * RESUMED)
    uninterrupted = pool4.run(_run, family, overrides, (2, 2), True, total, None, first, SAVED_AT)[0]
    at_1x4 = pool4.run(_run, family, overrides, (1, 4), True, range(after_save, after_save + RESUMED),
                       first, second, after_save + RESUMED - 1)
    at_4x1 = pool4.run(_run, family, overrides, (4, 1), True, range(after_save + RESUMED, total.stop), second)
    for rank in range(4):
        _assert_continues(at_1x4[rank], uninterrupted[after_save:after_save + RESUMED], "(2, 2) -> (1, 4)")
        _assert_continues(at_4x1[rank], uninterrupted[after_save + RESUMED:], "(1, 4) -> (4, 1)")


def test_fsdp_tp_resumes_at_other_mesh_shapes(pool4, tmp_path):
    """phi3: qkv_proj (GQA) packed in rank order, a permutation that differs at tp 2 and 4;
    gate_up_proj a _StridedShard under FSDP2's dp shard; embedding and lm_head sharded by rows under
    it, which DCP reshards itself."""
    _resume_across_meshes(pool4, tmp_path, "phi3", {})


@pytest.mark.slow
@pytest.mark.parametrize("family, overrides", [
    pytest.param("llama", {}, id="llama"),
    pytest.param("gpt2", {}, id="gpt2"),
    pytest.param("falcon", {}, id="falcon"),
    pytest.param("yuan", {}, id="yuan"),
    pytest.param("llama", {"num_key_value_heads": 2}, id="llama-kv2"),  # kv heads split at tp 2, repeated at tp 4
])
def test_fsdp_tp_resumes_at_other_mesh_shapes_more_families(pool4, tmp_path, family, overrides):
    _resume_across_meshes(pool4, tmp_path, family, overrides)


def test_tp_resumes_at_another_tp_size_through_own_dcp_calls(pool2, pool4, tmp_path):
    """Without FSDP, saved and loaded by dcp.save / dcp.load on tp.dcp.TrainingState."""
    ckpt = str(tmp_path / "at_tp2")
    steps = range(SAVED_AT + 1 + RESUMED)
    uninterrupted = pool2.run(_run, "phi3", {}, (1, 2), False, steps, None, ckpt, SAVED_AT, True)[0]
    resumed = pool4.run(_run, "phi3", {}, (1, 4), False, range(SAVED_AT + 1, steps.stop), ckpt, None, None, True)
    for losses in resumed:
        _assert_continues(losses, uninterrupted[SAVED_AT + 1:], "tp 2 -> tp 4")


def test_torch_own_state_dict_and_dcp_reshard_fused_weights(pool2, pool4, tmp_path):
    """torch's get_state_dict + dcp.save at TP 2, dcp.load + set_state_dict at TP 4, with no tp call
    in between: phi3's fused qkv_proj (GQA) and gate_up_proj are stored in parts, each an ordinary
    DTensor, so DCP reshards them itself."""
    path, saved = str(tmp_path / "torch"), functools.partial(tiny_model, "phi3")
    pool2.run(torch_dcp.save, saved, path)
    assert pool4.run(torch_dcp.mismatches, functools.partial(tiny_model, "phi3", seed=1), saved, path) == [[]] * 4


def _save_model_alone(path: str) -> None:
    model = tiny_model("llama")
    tp.apply(model, init_device_mesh("cpu", (dist.get_world_size(),)), trial=False)
    tp.dcp.save(model, path)


def _load_with_optimizer(path: str) -> str:
    model = tiny_model("llama")
    tp.apply(model, init_device_mesh("cpu", (dist.get_world_size(),)), trial=False)
    with pytest.raises(tp.CheckpointError) as refused:
        tp.dcp.load(model, path, optimizer=torch.optim.AdamW(model.parameters()))
    return str(refused.value)


def test_an_optimizer_cannot_resume_from_a_model_alone(pool2, tmp_path):
    path = str(tmp_path / "model_alone")
    pool2.run(_save_model_alone, path)
    for message in pool2.run(_load_with_optimizer, path):
        assert "holds no optimizer state" in message, message
