"""Config flags of published checkpoints that the tiny default configs never turn on, and inputs a
user can get wrong: the sharded model matches the unsharded one, or raises what it raises."""

import warnings

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate

import tp
import tp.checks.sizes
import tp.testing.models
from tp.sharding.collectives import to_local
from tp.testing.models import tiny_model


@pytest.mark.parametrize("pool_name", ["pool2", "pool4"])
def test_olmo_with_clip_qkv_clamps_its_sharded_outputs_in_place(pool_name, request):
    # published OLMo checkpoints set clip_qkv; the model clamps q, k and v with clamp_
    result = tp.verify("olmo", tp=int(pool_name[-1]), config_overrides={"clip_qkv": 0.05},
                       pool=request.getfixturevalue(pool_name))
    assert result.ok, result.table()


def _out_of_range_ids_on_rank() -> list[tuple[str, str]]:
    reference = tiny_model("llama")
    model = tiny_model("llama")
    tp.apply(model, init_device_mesh("cpu", (dist.get_world_size(),)))
    vocab = reference.config.vocab_size
    found = []
    for ids in (torch.tensor([[5, vocab]]), torch.tensor([[-1, 5]])):
        for m in (reference, model):
            try:
                m(input_ids=ids)
                found.append(("no error", ""))
            except IndexError as e:
                found.append(("IndexError", str(e)))
    return found


def test_token_ids_outside_the_vocabulary_raise_what_the_unsharded_model_raises(pool2):
    for found in pool2.run(_out_of_range_ids_on_rank):
        assert found == [("IndexError", "index out of range in self")] * 4, found


def _to_local_on_rank() -> tuple[bool, bool, bool]:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    x = torch.randn(3, 4, requires_grad=True)
    sharded = DTensor.from_local(x * 2, mesh, [Replicate()], run_check=False)
    local = to_local(sharded)
    no_copy = local.data_ptr() == sharded._local_tensor.data_ptr()
    local.clamp_(min=-0.5, max=0.5)  # DTensor.to_local() would refuse this in-place change
    local.sum().backward()
    expected = 2 * ((x * 2).abs() <= 0.5).float()
    return no_copy, torch.equal(x.grad, expected), not local._is_view()


def test_to_local_gives_a_tensor_the_model_may_change_in_place(pool2):
    assert pool2.run(_to_local_on_rank) == [(True, True, True)] * 2


def test_expert_widths_grouped_mm_cannot_take_are_refused_with_the_sizes_that_work():
    # 40 intermediate features: 10 float32 columns per rank at TP=4, a 40-byte row stride that
    # torch's grouped matmul rejects mid-forward ("strides should be multiple of 16 bytes")
    model = tp.testing.models.build(tp.testing.models.family_config("mixtral", intermediate_size=40), device="meta")
    lines, working = tp.checks.sizes.problems(model, tp.resolve(model, 4), 4)
    assert lines == ["model.layers.*.mlp.experts.down_proj: down_proj part 0: 10 rows per rank at tp=4 are not a "
                     "multiple of 4, the 16 bytes per row that grouped_mm needs; choose a tensor-parallel size that "
                     "keeps them aligned, or set config._experts_implementation = 'eager'"]
    assert working == [1, 2, 5]  # at 5 the 8 query heads split balanced (2, 2, 2, 1, 1)


def test_an_untested_transformers_release_is_warned_about_once(monkeypatch):
    import transformers

    from tp.plan import versions

    versions.warn_if_untested.cache_clear()
    monkeypatch.setattr(transformers, "__version__", "9.1.0")
    with pytest.warns(UserWarning, match=r"transformers 9.1.0 is not a release tp was tested with \(5.23, 5.24, 5.25\)"):
        versions.warn_if_untested()
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        assert versions.warn_if_untested() is not None
    assert not again  # once per process
    versions.warn_if_untested.cache_clear()
    monkeypatch.setattr(transformers, "__version__", "5.24.0")
    assert versions.warn_if_untested() is None
    versions.warn_if_untested.cache_clear()
