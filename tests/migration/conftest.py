from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.migration._procs import Procs
from tests.support import workers
from tests.support.workers import server_workers

__all__ = ["server_workers"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    workers.parametrize(metafunc)  # every test runs against --workers 1 and --workers 2


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.stop_all()
