"""Fixtures of the fault-injection tests: the misbehaving fake provider and the launcher of
worker processes (see harness.py for the machinery and the checks)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.reliability.harness import ChaosServer
from tests.support.helpers import DIMS


@pytest.fixture
def fake() -> Iterator[ChaosServer]:
    """An in-process fake OpenAI server (8-dim vectors) that worker subprocesses call."""
    with ChaosServer(dims=DIMS, seed=6) as srv:
        yield srv
