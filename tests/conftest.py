"""Shared gloo worker pools: each is started once per test session, not per test."""

import pytest

from tp.launch import WorkerPool


@pytest.fixture(scope="session")
def pool2():
    with WorkerPool(2) as pool:
        yield pool


@pytest.fixture(scope="session")
def pool4():
    with WorkerPool(4) as pool:
        yield pool
