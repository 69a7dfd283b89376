"""tp.apply tries a registered family's plan on a twin of the model before sharding it: a plan
that does not reproduce the unsharded model (another transformers release, a config flag the
family never met) is refused; a passed trial is remembered on disk."""

import textwrap
import warnings

import pytest
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import tp
from tp.infer.inference import twin_of
from tp.testing.models import build, family_config, tiny_model

# phi3's qkv_proj packs [q; k; v]; a plain colwise split hands rank 0 all of q and part of k.
# Layout by layout the plan is consistent, so only running it shows it is wrong.
WRONG = """
    [families.phi3_wrong]
    model_types = ["phi3"]
    extends = "phi3"
    [families.phi3_wrong.plan]
    "layers.*.self_attn.qkv_proj" = "colwise"
    """


def _apply_on_rank(registry: str | None, trial: bool) -> tuple[str, str]:
    model = tiny_model("phi3")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            report = tp.apply(model, mesh, registry=registry, trial=trial)
        except tp.TPError as e:
            return type(e).__name__, str(e)
    said = [str(w.message) for w in caught if "trial=False" in str(w.message)]
    return "sharded", report.trial or (said[0] if said else "")


@pytest.fixture
def wrong_registry(tmp_path):
    path = tmp_path / "registry.toml"
    path.write_text(textwrap.dedent(WRONG))
    return str(path)


def test_a_family_plan_that_does_not_reproduce_the_model_is_refused(pool2, wrong_registry):
    for name, message in pool2.run(_apply_on_rank, wrong_registry, True):
        assert name == "PlanError", message
        assert "the plan of family 'phi3_wrong' does not reproduce the unsharded model when tried on the model " \
               "itself: the logits differs by" in message, message


def test_without_the_trial_the_same_plan_is_wrong_and_a_warning_says_what_is_lost(pool2, wrong_registry):
    for name, said in pool2.run(_apply_on_rank, wrong_registry, False):
        assert name == "sharded" and "the plan is not tried" in said and "silently wrong" in said, said
    result = tp.verify("phi3_wrong", tp=2, registry=wrong_registry, trial=False, pool=pool2)
    assert not result.ok and result.logits_max_abs > 1e-3


def test_a_passed_trial_is_remembered(pool2):
    first = pool2.run(_apply_on_rank, None, True)
    again = pool2.run(_apply_on_rank, None, True)
    assert all(name == "sharded" for name, _ in first + again)
    assert first[0][1].startswith(("passed on the model itself in", "passed on the model itself before")), first
    assert again[0][1].startswith("passed on the model itself before (cached in"), again


def test_the_twin_of_a_large_model_keeps_its_config_flags():
    model = build(family_config("olmo", tiny=False, clip_qkv=8.0, attention_bias=True), device="meta")
    twin, traced = twin_of(model)
    assert (twin.config.clip_qkv, twin.config.attention_bias) == (8.0, True)
    assert twin.config.hidden_size == 64 and traced == "a tiny OlmoForCausalLM with attention_bias=True, clip_qkv=8.0"


def test_tp_1_expects_no_collectives_and_verifies():
    # one rank communicates nothing: the report predicts 0 / 0, and tp.verify passes
    result = tp.verify("llama", tp=1)
    assert result.ok and (result.expected_forward, result.expected_backward) == (0, 0), result.table()


def test_twin_flags_leave_out_sizes_and_per_layer_lists():
    from transformers import AutoConfig

    from tp.infer.flags import flags_of

    # xlnet's d_head is a size; Gemma 3n's activation sparsity is one value per real layer
    assert flags_of(AutoConfig.for_model("xlnet")) == {}
    assert flags_of(AutoConfig.for_model("gemma3n_text")) == {}
    assert flags_of(AutoConfig.for_model("olmo", clip_qkv=8.0, attention_bias=True)) == \
        {"attention_bias": True, "clip_qkv": 8.0}
