"""The plain column- and row-parallel linears compute on local tensors (tp/styles/local_linear.py):
a Megatron MLP pair matches the unsharded one forward and backward, runs no DTensor operation in
the forward, costs one all-reduce each way, and leaves an output the model may change in place."""

import copy

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

import tp
from tp.testing.counter import CollectiveCounter


class DTensorOps(TorchDispatchMode):
    """Records the operators called with a DTensor argument."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _pair_on_rank() -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from tp.styles.local_linear import LocalColwise, LocalRowwise

    torch.manual_seed(0)
    reference = MLP()
    model = parallelize_module(copy.deepcopy(reference), init_device_mesh("cpu", (dist.get_world_size(),)),
                               {"up": LocalColwise(), "down": LocalRowwise()})
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    x_ref, x_tp = x.clone().requires_grad_(), x.clone().requires_grad_()

    with CollectiveCounter() as forward, DTensorOps() as dtensor_ops:
        out = model(x_tp)
    plain_output = type(out) is torch.Tensor
    out.add_(1.0)  # the model may change the output in place
    ref_out = reference(x_ref).add_(1.0)
    with CollectiveCounter() as backward:
        out.square().sum().backward()
    ref_out.square().sum().backward()
    grads = {n: (tp.full_tensor(p.grad) - dict(reference.named_parameters())[n].grad).abs().max().item()
             for n, p in model.named_parameters()}
    return {"out": (out - ref_out).abs().max().item(), "input_grad": (x_tp.grad - x_ref.grad).abs().max().item(),
            "grads": grads, "dtensor_ops_in_forward": dtensor_ops.ops, "plain_output": plain_output,
            "forward": dict(forward.counts()), "backward": dict(backward.counts()),
            "all_dtensor": all(isinstance(p, DTensor) for p in model.parameters())}


@pytest.mark.parametrize("pool_name", ["pool2", "pool4"])
def test_megatron_pair_on_local_tensors(pool_name, request):
    for r in request.getfixturevalue(pool_name).run(_pair_on_rank):
        assert r["out"] <= 1e-5 and r["input_grad"] <= 1e-5, r
        assert max(r["grads"].values()) <= 1e-5, r
        assert r["dtensor_ops_in_forward"] == [], r
        assert r["plain_output"] and r["all_dtensor"], r
        assert r["forward"] == {"all_reduce": 1} and r["backward"] == {"all_reduce": 1}, r


def _decode_step_on_rank() -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from tp.testing.models import tiny_model

    model = tiny_model("llama").eval()
    tp.apply(model, init_device_mesh("cpu", (dist.get_world_size(),)))
    block_inputs = []  # the attention's input after its block_input hook, which ran first
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda module, args, kwargs: block_inputs.append(type(kwargs["hidden_states"]).__name__), with_kwargs=True)
    ids = torch.tensor([[5, 17, 42, 8]])
    with torch.no_grad(), DTensorOps() as no_grad:
        model(input_ids=ids)
    model(input_ids=ids)
    return {"no_grad": no_grad.ops, "block_inputs": block_inputs}


def test_a_decode_forward_runs_no_dtensor_operator(pool2):
    """Under no_grad the shared block input stays a plain tensor (it has no gradient to sum), so a
    forward of a tp.apply'd Llama dispatches no DTensor operator; with gradients the block input is
    a replicated DTensor that the linears read locally."""
    for r in pool2.run(_decode_step_on_rank):
        assert r["no_grad"] == [], r["no_grad"]
        assert r["block_inputs"] == ["Tensor", "DTensor"], r["block_inputs"]


def test_a_block_holding_a_module_that_computes_on_dtensors_keeps_its_input_a_dtensor():
    """Yuan's filter with ``replicate`` adds its input to its DTensor output: its attention's block
    input stays a DTensor under no_grad too (``dtensor_always``); llama's need not."""
    from tp.testing.models import tiny_model

    yuan = tp.resolve(tiny_model("yuan"), 2, family="yuan_replicate").decisions
    assert dict(yuan["model.layers.0.self_attn"].style.args).get("dtensor_always") is True
    llama = tp.resolve(tiny_model("llama"), 2).decisions
    assert not dict(llama["model.layers.0.self_attn"].style.args).get("dtensor_always")
