"""A style contributed from outside tp: defined in this file, registered from a user registry.toml,
and handled by the plan, the size check, the report, ``tp plan`` and ``tp.verify`` with no edit
under tp/."""

import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel

import tp
from tp.checks import report as report_
from tp.checks import sizes
from tp.errors import RegistryError
from tp.plan.registry import load_registry
from tp.styles import Act, Args, Site, Style
from tp.testing.models import build, family_config


class OutputHalvesArgs(Args):
    note: str = ""  # an argument only to show that a contributed style validates its own


def _plain_input_gradient(site: Site) -> tuple[int, int]:
    """No collective in the forward; its input's gradient is all-reduced unless a shared block
    input sums it first."""
    return 0, int(site.plain_input)


# torch's own ColwiseParallel under a new name, with every fact tp needs declared here.
MY_COLWISE = Style(
    name="my_colwise", build=lambda site: ColwiseParallel(), args=OutputHalvesArgs, supports=(nn.Linear,),
    doc="output features sharded (a contributed copy of colwise)", reads=Act.REPLICATED, leaves=Act.FEATURES,
    sharded_dims=lambda site: {"weight": 0, "bias": 0}, collectives=_plain_input_gradient,
    opens_block=lambda args: True)

HERE = Path(__file__).resolve()


def _registry(tmp_path: Path, styles: str) -> Path:
    path = tmp_path / "registry.toml"
    path.write_text(f"""
[styles]
{styles}

[families.my_llama]
model_types = ["llama"]
extends = "llama"

[families.my_llama.plan]
"layers.*.mlp.gate_proj" = "my_colwise"
"layers.*.mlp.up_proj" = {{ style = "my_colwise", note = "up" }}
""")
    return path


@pytest.fixture
def user_registry(tmp_path):
    return _registry(tmp_path, f'my_colwise = "{HERE}:MY_COLWISE"')


def test_plan_size_check_and_report_read_the_contributed_descriptor(user_registry):
    model = build(family_config("llama"), device="meta")  # tiny sizes: hidden 64, FFN 128
    plan = tp.resolve(model, 2, registry=user_registry)
    assert plan.family == "my_llama"
    gate = plan.decisions["model.layers.0.mlp.gate_proj"]
    assert gate.style.name == "my_colwise" and gate.source == "family my_llama"
    assert plan.decisions["model.layers.0.mlp.up_proj"].style.options.note == "up"
    # its parent gets a shared block input, as the descriptor's opens_block says
    assert plan.decisions["model.layers.0.mlp"].style.name == "block_input"

    report = report_.build(model, plan, 2)
    row = next(r for r in report.rows if r.module == "model.layers.0.mlp.gate_proj")
    assert row.style == "my_colwise" and row.shapes == "weight [128, 64] -> [64, 64]"
    # the same cost as llama's colwise: 2 all-reduces per block each way
    assert (report.collectives.forward_per_block, report.collectives.backward_per_block) == (2, 2)

    lines, working = sizes.problems(model, plan, 3)
    assert "model.layers.*.mlp.gate_proj: weight.shape[0] = 128 does not divide by tp=3" in lines
    assert 3 not in working and 2 in working


def test_tp_plan_command_shows_the_contributed_style(user_registry):
    out = subprocess.run([sys.executable, "-m", "tp", "plan", "my_llama", "--tp", "2", "--tiny",
                          "--registry", str(user_registry)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    up = next(line for line in out.stdout.splitlines() if line.startswith("model.layers.0.mlp.up_proj "))
    assert up.split()[1:3] == ["Linear", "my_colwise(note=up)"] and up.endswith("weight [128, 64] -> [64, 64]")


def test_verify_shards_with_the_contributed_style(user_registry, pool2):
    result = tp.verify("my_llama", tp=2, registry=str(user_registry), pool=pool2)
    assert result.ok, result.table()
    assert result.per_block_forward == 2 and result.per_block_backward == 2


@pytest.mark.parametrize("styles, words", [
    ('colwise = "{here}:MY_COLWISE"', ["styles.colwise", "'my_colwise'", "its own name"]),
    ('my_colwise = "{here}:NO_SUCH_STYLE"', ["styles.my_colwise", "cannot load", "NO_SUCH_STYLE"]),
    ('my_colwise = "{here}"', ["styles.my_colwise", "expected 'file.py:ATTRIBUTE'"]),
    ('my_colwise = "{here}:HERE"', ["styles.my_colwise", "is a PosixPath, not a tp.styles.Style"]),
])
def test_bad_style_entries_are_refused_with_the_entry_named(tmp_path, styles, words):
    path = _registry(tmp_path, styles.format(here=HERE))
    with pytest.raises(RegistryError) as error:
        load_registry(path)
    assert all(w in str(error.value) for w in words), str(error.value)


def test_a_contributed_style_cannot_take_a_built_in_name(tmp_path):
    other = tmp_path / "styles.py"
    other.write_text("from tp.styles.linear import COLWISE\n")
    path = tmp_path / "registry.toml"
    path.write_text('[styles]\ncolwise = "styles.py:COLWISE"\n')
    with pytest.raises(RegistryError, match="style 'colwise' is built in; give the contributed style another name"):
        load_registry(path)


def test_arguments_of_a_contributed_style_are_validated(tmp_path):
    path = _registry(tmp_path, f'my_colwise = "{HERE}:MY_COLWISE"')
    path.write_text(path.read_text().replace('note = "up"', "note = 3"))
    with pytest.raises(RegistryError, match="style 'my_colwise': note: input should be a valid string, found 3"):
        load_registry(path)
