"""Fixtures for the plugin tests: ``pynbd serve`` with the example plugins and with
small plugins written for these tests (tests/plugins/testplugins/)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import REPO, pynbd_env, run_pynbd
from tests.support.pynbd_server import ServerFactory

EXAMPLES = REPO / "examples" / "plugins"
#: plugins written for the tests (a package: also importable as ``testplugins.NAME``)
TESTPLUGINS = Path(__file__).resolve().parent / "testplugins"

MiB = 1024 * 1024


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServerFactory]:
    """``serve(*args)`` starts ``pynbd serve ARGS`` on 127.0.0.1:0 and returns it."""
    f = ServerFactory(tmp_path)
    try:
        yield f
    finally:
        f.close()
        for srv in f.servers:  # shown by pytest when the test failed
            print(f"--- {' '.join(srv.args[3:])}\n{srv.stderr[-6000:]}")


def run(*cmd: str, ok: bool = True, timeout: float = 120,
        **kw: object) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    if ok:
        assert p.returncode == 0, f"{cmd}: rc={p.returncode}\n{p.stdout}\n{p.stderr}"
    return p  # type: ignore[no-any-return]


def serve_fails(*args: str, pythonpath: str | None = None,
                timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``pynbd serve --port 0 ARGS`` expecting it to refuse to start; the
    finished process (the caller checks the exit status and stderr)."""
    env = pynbd_env(pythonpath=[pythonpath] if pythonpath else [])
    p = run_pynbd("serve", "--bind", "127.0.0.1", "--port", "0", *args, text=True,
                  timeout=timeout, env=env)
    assert p.returncode != 0 or p.stdout == "", "the server started"
    return p
