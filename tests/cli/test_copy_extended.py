"""`pynbd copy` with extended headers: holes of any size are one 64-bit WRITE_ZEROES,
requests up to what the servers advertise (64 MiB between pynbd servers), and
--no-extended-headers falls back to 32-bit requests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbd

from pynbd.server.control import control_request
from tests.support.processes import run_pynbd
from tests.support.pynbd_server import ServerFactory

GiB = 1 << 30
MiB = 1 << 20


def _requests(ctl: str) -> int:
    st = control_request(ctl, {"cmd": "status"})["status"]
    return int(st["exports"][0]["requests"])


def _copy(*args: str) -> subprocess.CompletedProcess[str]:
    return run_pynbd("copy", *args, text=True, timeout=300, python=sys.executable)


def test_sparse_16g_copy_uses_64bit_zeroing(tmp_path: Path) -> None:
    f = ServerFactory(tmp_path)
    try:
        src = f("memory:16G")
        ctl = str(tmp_path / "dst.ctl")
        dst = f("--control", ctl, "memory:16G")
        h = nbd.NBD()
        h.connect_uri(src.uri)
        head, tail = os.urandom(3 * MiB), os.urandom(MiB)
        h.pwrite(head, 0)
        h.pwrite(tail, 15 * GiB)
        h.shutdown()
        before = _requests(ctl)
        r = _copy("--request-size", "64M", src.uri, dst.uri)
        assert r.returncode == 0, r.stderr
        extended = _requests(ctl) - before
        h = nbd.NBD()
        h.connect_uri(dst.uri)
        assert h.pread(len(head), 0) == head and h.pread(len(tail), 15 * GiB) == tail
        assert h.pread(4096, 8 * GiB) == bytes(4096)
        h.shutdown()
        # two data writes and two holes (~15.99 GiB each side of nothing): a handful of
        # requests, where 32-bit requests need one WRITE_ZEROES per 4 GiB at least
        assert extended <= 6, extended
        before = _requests(ctl)
        r = _copy("--no-extended-headers", src.uri, dst.uri)
        assert r.returncode == 0, r.stderr
        compact = _requests(ctl) - before
        assert compact > extended
    finally:
        f.close()
