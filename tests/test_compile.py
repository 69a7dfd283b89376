"""``torch.compile`` of a tp-sharded model at TP=2: the forward and a training step of llama and
phi3 compile to one graph with no graph break (through AOT autograd, so the backward is compiled
too), and give the eager model's loss and gradients.

Under sequence parallelism it does not compile clean yet (the strict xfail below says where).
Slow: compiling takes 5-35 s a case on a shared 2-core machine."""

import pytest
import torch
from torch.distributed.tensor import DTensor

pytestmark = pytest.mark.slow


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _compiled_step_on_rank(family: str, sequence_parallel: bool) -> dict:
    import torch.distributed as dist
    from torch._dynamo.backends.registry import lookup_backend
    from torch._dynamo.utils import counters
    from torch.distributed.device_mesh import init_device_mesh

    import tp
    from tp.testing.models import tiny_model

    torch._dynamo.reset()
    counters.clear()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))

    def sharded():
        m = tiny_model(family).float()  # the same seed each time
        tp.apply(m, mesh, sequence_parallel=sequence_parallel)
        return m

    model, eager = sharded(), sharded()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))

    graphs = []

    def counting_aot_eager(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    def loss(m):
        return m(input_ids=ids, labels=ids).loss

    compiled = torch.compile(loss, backend=counting_aot_eager)
    value = compiled(model)
    value.backward()
    reference = loss(eager)
    reference.backward()
    eager_grads = dict(eager.named_parameters())
    grads = {n: ((local(p.grad) - local(eager_grads[n].grad)).abs().max() / local(eager_grads[n].grad).abs().max()).item()
             for n, p in model.named_parameters()}
    return {"graphs": len(graphs), "breaks": sum(counters["graph_break"].values()),
            "loss": abs(value.item() - reference.item()), "worst_grad_rel": max(grads.values())}


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_training_step_compiles_to_one_graph(family, pool2):
    for r in pool2.run(_compiled_step_on_rank, family, False):
        assert r["graphs"] == 1 and r["breaks"] == 0, r
        # float32; the compiled graph may order sums differently from the eager model
        assert r["loss"] <= 1e-5 and r["worst_grad_rel"] <= 1e-4, r


@pytest.mark.xfail(strict=True, reason="under sequence parallelism to_local's _OwnedLocal (tp/sharding/collectives.py) "
                   "breaks the graph (dynamo cannot hold the DTensorSpec it saves on ctx, nor trace "
                   "compute_global_tensor_info in its backward), and the compiled backward fails with "
                   "'as_strided not supported with DTensor'")
def test_sequence_parallel_training_step_compiles_to_one_graph(pool2):
    for r in pool2.run(_compiled_step_on_rank, "llama", True):
        assert r["graphs"] == 1 and r["breaks"] == 0, r
