"""Interop tests run against ``pynbd serve --workers 1`` and ``--workers 2``."""

from __future__ import annotations

import pytest
from tests.support import workers
from tests.support.workers import server_workers

__all__ = ["server_workers"]

#: modules that start no ``pynbd serve`` whose worker count matters: run once (RBD
#: exports are served from one process whatever --workers says)
ONCE = frozenset({"test_ceph_msgr2", "test_rbd_interop"})


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    workers.parametrize(metafunc, ONCE)
