"""Shared gloo worker pools: each is started once per test session, not per test."""

import os
import tempfile
import textwrap
from pathlib import Path

import pytest

import tp.testing.models
from tp.testing.launch import WorkerPool

# Passed trials of family plans are remembered on disk; the tests start from none (set before
# the worker pools start, so that they inherit it).
os.environ["TP_TRIAL_CACHE"] = tempfile.mkdtemp(prefix="tp-trials-")


@pytest.fixture(scope="session")
def pool2():
    with WorkerPool(2) as pool:
        yield pool


@pytest.fixture(scope="session")
def pool3():
    with WorkerPool(3) as pool:
        yield pool


@pytest.fixture(scope="session")
def pool4():
    with WorkerPool(4) as pool:
        yield pool


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """Overrides in the developer's environment must not leak into the tests."""
    for name in ("TP_REGISTRY", "TP_CONFIG", "ALLREDUCE_LINEAR_ITEMS", "KEEP_LINEAR_ITEMS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def llama_meta():
    """A full-size default llama on the meta device: plans and sizes, no memory."""
    return tp.testing.models.build(tp.testing.models.family_config("llama"), device="meta")


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="run only the slow sweeps (tests marked slow), which the default run leaves out")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a sweep over many models or flags; run with --slow (.ci/run does)")


def pytest_collection_modifyitems(config, items):
    slow = config.getoption("--slow")
    chosen = [item for item in items if ("slow" in item.keywords) == slow]
    config.hook.pytest_deselected(items=[item for item in items if item not in chosen])
    items[:] = chosen


@pytest.fixture
def mine_registry(tmp_path):
    """Write a user registry whose family ``mine`` extends llama with ``entries`` (TOML lines) in its
    ``table`` (``plan`` or ``sequence_parallel``); returns its path."""

    def write(entries: str, table: str = "plan") -> Path:
        path = tmp_path / "registry.toml"
        path.write_text(f'[families.mine]\nmodel_types = ["llama"]\nextends = "llama"\n[families.mine.{table}]\n'
                        + textwrap.dedent(entries))
        return path

    return write
