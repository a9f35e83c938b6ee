"""Fixtures for the resource tests (helpers live in ``fakelab.py``)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from fakelab import make_spec, prepare

from kvmstate.resources.base import Event, Options, RunContext
from kvmstate.spec import Spec
from kvmstate.testing.fake import FakeCluster


@pytest.fixture
def spec() -> Spec:
    return make_spec()


@pytest.fixture
def cluster(spec: Spec) -> Iterator[FakeCluster]:
    c = FakeCluster(spec)
    prepare(c)
    yield c
    asyncio.run(c.close())


@pytest.fixture
def events() -> list[Event]:
    return []


@pytest.fixture
def ctx(spec: Spec, cluster: FakeCluster, events: list[Event]) -> RunContext:
    return RunContext(spec, cluster, Options(), events.append)
