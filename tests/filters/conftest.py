"""Fixtures for the filter tests: ``pynbd serve`` with ``--filter`` as a real subprocess."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.pynbd_server import ServerFactory


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServerFactory]:
    """``serve(*args)`` starts ``pynbd serve ARGS`` on 127.0.0.1:0 and returns it."""
    f = ServerFactory(tmp_path)
    try:
        yield f
    finally:
        f.close()
