"""Fixtures for the operations/security tests: start `pynbd serve` with given flags."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import workers
from tests.support.certs import make_pki
from tests.support.processes import Process, pynbd_argv, pynbd_env
from tests.support.workers import serve_args, server_workers

__all__ = ["server_workers"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    workers.parametrize(metafunc)


@dataclass
class Served:
    process: Process
    uris: list[str]
    control: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.process.proc

    @property
    def uri(self) -> str:
        return self.uris[0]

    @property
    def port(self) -> int:
        m = re.search(r":(\d+)/", self.uri)
        assert m, self.uri
        return int(m.group(1))

    def log(self) -> str:
        return self.process.stderr

    def stop(self) -> int | None:
        return self.process.stop()


def start_pynbd(tmp: Path, *args: str, n_uris: int = 1, timeout: float = 20.0) -> Served:
    cmd = pynbd_argv("serve", *serve_args(args), python=sys.executable)
    proc = Process(cmd, name="serve", env=pynbd_env({"PYTHONUNBUFFERED": "1"}), log_dir=tmp,
                   stop_timeout=20.0)
    try:
        proc.wait_for(lambda: len([x for x in proc.lines() if x.strip()]) >= n_uris,
                      f"{n_uris} URI line(s)", timeout)
    except RuntimeError as exc:
        proc.kill()
        raise AssertionError(f"pynbd serve {args} did not start: {exc}") from None
    uris = [x for x in proc.lines() if x.strip()]
    control = None
    if "--control" in args:
        control = args[list(args).index("--control") + 1]
    return Served(proc, uris, control)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[object]:
    started: list[Served] = []

    def _start(*args: str, n_uris: int = 1) -> Served:
        s = start_pynbd(tmp_path, *args, n_uris=n_uris)
        started.append(s)
        return s

    yield _start
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("tls") / "good", ca_name="good test CA")


@pytest.fixture(scope="session")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("tls-other") / "other", ca_name="other test CA")
