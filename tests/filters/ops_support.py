"""Helpers for the tests of the operations filters (rate, delay, error, log, stats):
``pynbd serve --filter ...`` as a real subprocess with a control socket, the ``pynbd``
CLI, qemu-io. Fixture names start with ``ops_`` (other filter tests share the folder)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nbd
import pytest

from tests.support.processes import run_pynbd
from tests.support.pynbd_server import PynbdServer, ServerFactory, free_unix_path


def pynbd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the ``pynbd`` CLI (this checkout's)."""
    return run_pynbd(*args, text=True, timeout=timeout, python=sys.executable)


def need(*programs: str) -> None:
    """A peer the test drives must be installed: fail loudly, never skip."""
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        pytest.fail(f"missing test peers: {', '.join(missing)} (install the Debian packages "
                    "libnbd-bin, qemu-utils, fio, nbdkit)", pytrace=False)


class Served:
    """A running ``pynbd serve`` with a control socket."""

    def __init__(self, srv: PynbdServer, control: str) -> None:
        self.srv = srv
        self.control = control

    @property
    def uri(self) -> str:
        return self.srv.uri

    def log(self) -> str:
        return self.srv.stderr

    def status(self) -> dict[str, Any]:
        r = pynbd("status", "--control", self.control)
        assert r.returncode == 0, r.stderr
        st: dict[str, Any] = json.loads(r.stdout)
        return st

    def export(self, name: str = "") -> dict[str, Any]:
        for e in self.status()["exports"]:
            if e["name"] == name or (not name and e["default"]):
                return e  # type: ignore[no-any-return]
        raise AssertionError(f"no export {name!r}")

    def filter_stats(self, name: str, export: str = "") -> dict[str, Any]:
        got: dict[str, Any] = self.export(export)["filters"].get(name, {})
        return got

    def configure(self, filter_name: str, *kv: str) -> subprocess.CompletedProcess[str]:
        return pynbd("filter", "--control", self.control, filter_name, *kv)

    def wait_for(self, pred: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        """Poll ``pred`` (bounded); fail with ``what`` if it never holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            time.sleep(0.05)
        assert pred(), f"timed out waiting for {what}"

    def stop(self) -> None:
        self.srv.stop()


@pytest.fixture
def ops_serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """``ops_serve(*args)``: ``pynbd serve -v --bind 127.0.0.1 --port 0 --control PATH
    ARGS`` (give ``--workers`` in ARGS to choose; the default is one per CPU)."""
    factory = ServerFactory(tmp_path)
    n = [0]

    def start(*args: str) -> Served:
        n[0] += 1
        control = free_unix_path(tmp_path, f"ctl{n[0]}.sock")
        srv = factory("--control", control, *args)
        return Served(srv, control)

    try:
        yield start
    finally:
        factory.close()


def serve_refused(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``pynbd serve ARGS`` that must refuse to start: returns the finished process."""
    return run_pynbd("serve", "--bind", "127.0.0.1", "--port", "0", *args, text=True,
                     timeout=60, cwd=cwd, python=sys.executable)


def qemu_io(uri: str, *cmds: str) -> subprocess.CompletedProcess[str]:
    """qemu-io on an NBD URI (raw format), each of ``cmds`` as a ``-c``."""
    need("qemu-io")
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    return subprocess.run([*args, uri], capture_output=True, text=True, timeout=120)


def connect(uri: str, strict: bool = True) -> nbd.NBD:
    h = nbd.NBD()
    if strict:
        h.set_strict_mode(nbd.STRICT_MASK)
    h.connect_uri(uri)
    return h


def errno_of(exc: nbd.Error) -> str:
    """libnbd's errno name for a failed command (``ENOSPC``)."""
    name = exc.errno
    if isinstance(name, int):
        import errno as _errno

        return _errno.errorcode.get(name, str(name))
    return str(name)


def no_traceback(text: str) -> bool:
    return "Traceback" not in text and not re.search(r"^\s+File \"", text, re.M)
