"""Fixtures for the operations/security tests: start `pynbd serve` with given flags."""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import workers
from tests.support.certs import make_pki
from tests.support.workers import serve_args, server_workers

__all__ = ["server_workers"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    workers.parametrize(metafunc)


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    uris: list[str]
    stderr_path: Path
    control: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return self.uris[0]

    @property
    def port(self) -> int:
        m = re.search(r":(\d+)/", self.uri)
        assert m, self.uri
        return int(m.group(1))

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


def start_pynbd(tmp: Path, *args: str, n_uris: int = 1, timeout: float = 20.0) -> Served:
    err = tmp / f"serve-{time.monotonic_ns()}.log"
    cmd = [sys.executable, "-m", "pynbd", "serve", *serve_args(args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err.open("wb"),
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    uris: list[str] = []
    buf = b""
    deadline = time.monotonic() + timeout
    while len(uris) < n_uris:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            proc.kill()
            raise AssertionError(f"pynbd serve {args} did not start: {err.read_text()}")
        if sel.select(timeout=min(left, 0.5)):
            chunk = os.read(proc.stdout.fileno(), 4096)
            buf += chunk
            *lines, rest = buf.split(b"\n")
            buf = rest
            uris += [ln.decode() for ln in lines if ln.strip()]
    sel.close()
    control = None
    if "--control" in args:
        control = args[list(args).index("--control") + 1]
    return Served(proc, uris, err, control)


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
