"""Fixtures the wire tests of the service share: one in-process service (127.0.0.1) per module, raw stubs on it,
and a job name of its own for every test."""

from __future__ import annotations

import re
import uuid

import pytest

from paramserver.service.local import serve_local
from tests.service.test_wire_errors import Wire


@pytest.fixture
def job_name(request: pytest.FixtureRequest) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', request.node.name)}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def svc():
    service = serve_local(2, host="127.0.0.1")
    yield service
    service.shutdown()


@pytest.fixture(scope="module")
def wire(svc):
    with Wire(svc.address) as w:
        yield w
