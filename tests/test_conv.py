"""ColwiseLayout / RowwiseLayout (the colwise and rowwise styles) on convolutions: exact against the
unsharded convolutions, forward and backward."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import parallelize_module

import tp
from tp.errors import SizeError
from tp.models.conv_block import ConvNet
from tp.styles.layout import ColwiseLayout, RowwiseLayout
from tp.testing.counter import CollectiveCounter

SEED = 1234
CONVS = {1: nn.Conv1d, 2: nn.Conv2d}


class ConvPair(nn.Module):
    """conv1 (3 -> 8 channels, stride 2) -> GELU -> conv2 (8 -> 5 channels, dilated)."""

    def __init__(self, dims: int, bias: bool, padding_mode: str = "zeros"):
        super().__init__()
        conv = CONVS[dims]
        padding = "same" if padding_mode == "same" else 2
        padding_mode = "zeros" if padding_mode == "same" else padding_mode
        self.conv1 = conv(3, 8, kernel_size=3, stride=2, padding=1, bias=bias)
        self.conv2 = conv(8, 5, kernel_size=3, padding=padding, dilation=2, bias=bias, padding_mode=padding_mode)

    def forward(self, x):
        return self.conv2(F.gelu(self.conv1(x)))


def _mesh():
    return init_device_mesh("cpu", (dist.get_world_size(),))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _compare(ref: nn.Module, model: nn.Module, x: torch.Tensor, seed: int) -> dict:
    """Run both models forward and backward on the same input and upstream gradient."""
    gathered_exact = all(
        torch.equal(_full(p), r) for p, r in zip(model.parameters(), ref.parameters(), strict=True)
    )
    x_ref, x_tp = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = ref(x_ref)
    with CollectiveCounter() as fwd:
        y = model(x_tp)
    torch.manual_seed(seed + 1)
    grad_out = torch.randn_like(y_ref)
    y_ref.backward(grad_out)
    with CollectiveCounter() as bwd:
        y.backward(grad_out if not isinstance(y, DTensor) else DTensor.from_local(grad_out, y.device_mesh, [Replicate()], run_check=False))
    params = dict(model.named_parameters())
    return {
        "output_kind": type(y).__name__,
        "output_max_abs": (_full(y) - y_ref).abs().max().item(),
        "input_grad_rel": _rel(x_tp.grad, x_ref.grad),
        "grad_rel": {name: _rel(_full(params[name].grad), r.grad) for name, r in ref.named_parameters()},
        "gathered_exact": gathered_exact,
        "placements": {name: str(tuple(p.placements)) for name, p in params.items() if isinstance(p, DTensor)},
        "dtensor_params": sorted(n for n, p in params.items() if isinstance(p, nn.Parameter) and isinstance(p, DTensor)),
        "sharded_params": sorted(n for n, p in params.items()
                                 if isinstance(p, DTensor) and not all(pl.is_replicate() for pl in p.placements)),
        "forward": dict(fwd.counts()),
        "backward": dict(bwd.counts()),
    }


def _pair_on_rank(seed: int, dims: int, bias: bool, padding_mode: str = "zeros", batched: bool = True,
                  local_output: bool = True) -> dict:
    mesh = _mesh()
    torch.manual_seed(seed)
    ref = ConvPair(dims, bias, padding_mode)
    plan = {"conv1": ColwiseLayout(use_local_output=local_output), "conv2": RowwiseLayout(use_local_output=local_output)}
    model = parallelize_module(copy.deepcopy(ref), mesh, plan)
    shape = (2, 3) + (11,) * dims if batched else (3,) + (11,) * dims
    return _compare(ref, model, torch.randn(shape), seed)


def _conv_net_on_rank(seed: int) -> dict:
    mesh = _mesh()
    torch.manual_seed(seed)
    ref = ConvNet(in_channels=3, channels=8, num_blocks=2, num_classes=10)
    model = copy.deepcopy(ref)
    assert tp.apply(model, mesh).family == "conv_example"  # the registry's plan
    return _compare(ref, model, torch.randn(2, 3, 12, 12), seed)


def _assert_exact(results: list[dict], all_reduces: int = 1) -> None:
    for r in results:
        assert r["output_max_abs"] <= 1e-5, r
        assert r["input_grad_rel"] <= 1e-4, r
        assert r["grad_rel"] and max(r["grad_rel"].values()) <= 1e-4, r
        assert r["gathered_exact"], r
        # every parameter stays a DTensor Parameter after the run; the convolutions' weights, and only
        # those, are sharded (a row-parallel conv's bias is replicated, added once after the all-reduce)
        assert r["dtensor_params"] == sorted(r["grad_rel"]), r
        assert r["sharded_params"] == sorted(n for n in r["grad_rel"] if n.rpartition(".")[0].endswith(("conv1", "conv2"))
                                             and not n.endswith("conv2.bias")), r
        assert r["forward"] == {"all_reduce": all_reduces}, r
        assert r["backward"] == {"all_reduce": all_reduces}, r


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dims", [1, 2], ids=["conv1d", "conv2d"])
@pytest.mark.parametrize("pool_name", ["pool2", "pool4"])
def test_colwise_rowwise_pair_matches_unsharded(pool_name, dims, bias, request):
    pool = request.getfixturevalue(pool_name)
    results = pool.run(_pair_on_rank, SEED, dims, bias)
    _assert_exact(results)
    placements = results[0]["placements"]
    assert placements["conv1.weight"] == "(Shard(dim=0),)" and placements["conv2.weight"] == "(Shard(dim=1),)"
    if bias:
        assert placements["conv1.bias"] == "(Shard(dim=0),)" and placements["conv2.bias"] == "(Replicate(),)"
    else:
        assert set(placements) == {"conv1.weight", "conv2.weight"}
    assert results[0]["output_kind"] == "Tensor"


@pytest.mark.parametrize("padding_mode", ["reflect", "circular", "same"])
def test_padding_modes_and_unbatched_input(pool2, padding_mode):
    _assert_exact(pool2.run(_pair_on_rank, SEED, 2, True, padding_mode))
    _assert_exact(pool2.run(_pair_on_rank, SEED, 1, True, padding_mode, False))


def test_dtensor_outputs(pool2):
    results = pool2.run(_pair_on_rank, SEED, 2, True, "zeros", True, False)
    _assert_exact(results)
    assert results[0]["output_kind"] == "DTensor"


@pytest.mark.parametrize("pool_name", ["pool2", "pool4"])
def test_conv_net_example_costs_one_all_reduce_per_block(pool_name, request):
    _assert_exact(request.getfixturevalue(pool_name).run(_conv_net_on_rank, SEED), all_reduces=2)


def _error_on_rank(case: str):
    """Try one misuse; the error comes back as values, since a task that raises closes the shared pool."""
    mesh = _mesh()
    try:
        if case == "groups":
            parallelize_module(nn.Conv2d(4, 8, 3, groups=2), mesh, ColwiseLayout())
        elif case == "depthwise":
            parallelize_module(nn.Conv1d(8, 8, 3, groups=8), mesh, RowwiseLayout())
        elif case == "transposed":
            parallelize_module(nn.ConvTranspose2d(8, 8, 3), mesh, ColwiseLayout())
        elif case == "out_channels":
            parallelize_module(nn.Conv2d(4, 6, 3), mesh, ColwiseLayout())
        elif case == "in_channels":
            parallelize_module(nn.Conv2d(6, 4, 3), mesh, RowwiseLayout())
        elif case == "full_input":
            conv = parallelize_module(nn.Conv2d(8, 4, 3), mesh, RowwiseLayout())
            try:
                conv(torch.randn(1, 8, 5, 5))
            except ValueError as e:
                return type(e).__name__, str(e), False, isinstance(conv.weight, DTensor)
        elif case == "forward_raises":
            conv = parallelize_module(nn.Conv2d(8, 4, 3), mesh, ColwiseLayout())
            try:
                conv(torch.randn(1, 5, 5, 5))  # 5 channels: conv2d itself raises
            except RuntimeError as e:
                return type(e).__name__, str(e), False, isinstance(conv.weight, DTensor)
    except (NotImplementedError, ValueError, TypeError, SizeError) as e:
        return type(e).__name__, str(e), isinstance(e, ValueError) and isinstance(e, SizeError), None
    return "no error", "", False, None


@pytest.mark.parametrize(
    "case, error, words",
    [
        ("groups", "NotImplementedError", ["ColwiseLayout", "groups=2"]),
        ("depthwise", "NotImplementedError", ["RowwiseLayout", "groups=8"]),
        ("transposed", "NotImplementedError", ["ConvTranspose2d"]),
    ],
)
def test_unsupported_modules_are_refused(pool2, case, error, words):
    name, message, _, _ = pool2.run(_error_on_rank, case)[0]
    assert name == error and all(w in message for w in words), message


@pytest.mark.parametrize("case, words", [("out_channels", ["6 output channels"]), ("in_channels", ["6 input channels"])])
def test_channels_that_do_not_divide_raise_a_size_error(pool4, case, words):
    for name, message, _, _ in pool4.run(_error_on_rank, case):
        assert name == SizeError.__name__, message
        assert all(w in message for w in words) and "tensor-parallel size 4" in message, message


def test_rowwise_refuses_a_full_input_and_keeps_its_parameters(pool2):
    name, message, _, restored = pool2.run(_error_on_rank, "full_input")[0]
    assert name == "ValueError" and "expects this rank's 4 of its 8 input features" in message, message
    assert restored


def test_parameters_come_back_when_forward_raises(pool2):
    name, _, _, restored = pool2.run(_error_on_rank, "forward_raises")[0]
    assert name == "RuntimeError" and restored


def test_styles_repr():
    assert repr(ColwiseLayout()) == "ColwiseLayout(parts=1, unit='row')"
    assert repr(RowwiseLayout(parts=2, unit="head")) == "RowwiseLayout(parts=2, unit='head')"
