"""Fixtures for the server tests: ``pynbd serve`` as a real subprocess."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.pynbd_server import PynbdServer, ServerFactory


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServerFactory]:
    """``serve(*args)`` starts ``pynbd serve ARGS`` on 127.0.0.1:0 and returns it."""
    f = ServerFactory(tmp_path)
    try:
        yield f
    finally:
        f.close()


@pytest.fixture
def mem_server(serve: ServerFactory) -> PynbdServer:
    """A 64 MiB memory export on TCP loopback."""
    return serve("memory:64M")
