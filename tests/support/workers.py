"""Which ``--workers`` the test suites run ``pynbd serve`` with.

The interop, security and migration suites run every test twice: against one worker
(everything in one process) and against two worker processes. An autouse fixture
(:func:`server_workers`, parametrized in those suites' conftest.py) sets the value;
every launcher of ``pynbd serve`` in tests/ passes it through :func:`serve_args`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import pytest

ENV = "PYNBD_TEST_WORKERS"
#: the values the suites are run with
WORKER_COUNTS = (1, 2)


def serve_args(args: Sequence[str]) -> list[str]:
    """``args`` for ``pynbd serve`` with the current test's ``--workers`` added (unless
    the test chose its own)."""
    n = os.environ.get(ENV)
    if not n or "--workers" in args:
        return list(args)
    return ["--workers", n, *args]


def parametrize(metafunc: pytest.Metafunc, once: frozenset[str] = frozenset()) -> None:
    """From a suite's ``pytest_generate_tests``: run each test with every worker count
    (modules named in ``once`` start no server whose worker count matters: one run)."""
    if "server_workers" not in metafunc.fixturenames:
        return
    counts = (1,) if metafunc.module.__name__.rsplit(".", 1)[-1] in once else WORKER_COUNTS
    metafunc.parametrize("server_workers", counts, indirect=True,
                         ids=[f"workers{n}" for n in counts])


@pytest.fixture(autouse=True)
def server_workers(request: pytest.FixtureRequest) -> Iterator[int]:
    n = int(getattr(request, "param", 1))
    old = os.environ.get(ENV)
    os.environ[ENV] = str(n)
    try:
        yield n
    finally:
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old
