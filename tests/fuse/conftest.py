"""Fixtures for ``pynbd fuse``: run it as a process on a temporary mountpoint and make
sure nothing stays mounted, whatever the test did.

FUSE needs /dev/fuse, libfuse 3 (Debian ``fuse3``, which also ships fusermount3) and the
``mfusepy`` binding (the ``fuse`` extra, pulled in by ``test``); scripts/test.sh installs
them. Missing pieces fail the tests loudly.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import Process, pynbd_argv, pynbd_env, pynbd_python

#: every wait in these tests is bounded by this
TIMEOUT = 30.0


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo
    out = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_type(path: str | os.PathLike[str]) -> str | None:
    """The filesystem type mounted exactly at ``path`` (last mount wins), or None."""
    target = os.path.realpath(path)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) > 4 and _unescape(fields[4]) == target:
                found = right.split()[0]
    return found


def mount_options(path: str | os.PathLike[str]) -> list[str]:
    """The per-mount options (ro, nosuid, ...) of the mount at ``path``."""
    target = os.path.realpath(path)
    found: list[str] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" - ")[0].split()
            if len(fields) > 5 and _unescape(fields[4]) == target:
                found = fields[5].split(",")
    return found


def is_mounted(path: str | os.PathLike[str]) -> bool:
    return mount_type(path) is not None


def force_unmount(path: str | os.PathLike[str]) -> None:
    """Detach whatever is mounted at ``path`` (bounded; never raises)."""
    for _ in range(5):
        if not is_mounted(path):
            return
        for cmd in (["fusermount3", "-u", "-z", str(path)], ["umount", "-l", str(path)]):
            try:
                subprocess.run(cmd, capture_output=True, timeout=10, check=False)
            except (OSError, subprocess.TimeoutExpired):
                pass
            if not is_mounted(path):
                return
        time.sleep(0.2)


def require_fuse() -> None:
    problems = []
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse is missing (load the fuse module)")
    if shutil.which("fusermount3") is None:
        problems.append("fusermount3 is missing (apt-get install fuse3)")
    r = subprocess.run([pynbd_python(), "-c", "import pynbd.fuse.mount as m; m.load_binding()"],
                       capture_output=True, text=True, timeout=60, env=pynbd_env(), check=False)
    if r.returncode != 0:
        problems.append(f"the FUSE binding does not load: {r.stderr.strip()[-500:]} "
                        "(pip install -e '.[test]' installs mfusepy)")
    if problems:
        pytest.fail("pynbd fuse cannot run here: " + "; ".join(problems), pytrace=False)


class FuseMount:
    """A running ``pynbd fuse URI MOUNTPOINT`` process."""

    def __init__(self, uri: str, mountpoint: Path, *args: str, wait: bool = True) -> None:
        self.mountpoint = mountpoint
        self.process = Process(pynbd_argv("fuse", *args, uri, str(mountpoint)),
                               name="pynbd-fuse", stop_timeout=15.0)
        self.argv = self.process.argv
        self.proc = self.process.proc
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        try:
            self.process.first_line(TIMEOUT)
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"pynbd fuse did not become ready (rc={self.proc.returncode}):"
                               f"\n{self.stderr}") from None

    @property
    def path(self) -> str:
        """The file the export appears as (printed by pynbd fuse when ready)."""
        return self.process.lines()[0]

    @property
    def stderr(self) -> str:
        return self.process.stderr

    def wait(self, timeout: float = TIMEOUT) -> int:
        return self.process.wait(timeout)

    def signal(self, sig: int = signal.SIGTERM, timeout: float = TIMEOUT) -> int:
        self.process.kill(sig)
        return self.wait(timeout)

    def stop(self) -> None:
        """Teardown: stop the process for sure and leave nothing mounted."""
        self.process.stop()
        force_unmount(self.mountpoint)
        if self.proc.poll() is None:  # was blocked on the mount
            self.proc.kill()
            self.proc.wait(15)


class Mounter:
    """Factory fixture: ``mount(uri, *args)`` mounts on a fresh directory."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.mounts: list[FuseMount] = []

    def mountpoint(self) -> Path:
        mp = self.tmp / f"mnt{len(self.mounts)}"
        mp.mkdir(exist_ok=True)
        return mp

    def __call__(self, uri: str, *args: str, mountpoint: Path | None = None,
                 wait: bool = True) -> FuseMount:
        mp = mountpoint if mountpoint is not None else self.mountpoint()
        m = FuseMount(uri, mp, *args, wait=False)
        self.mounts.append(m)
        if wait:
            m.wait_ready()
        return m

    def close(self) -> None:
        for m in self.mounts:
            m.stop()


@pytest.fixture(scope="session")
def fuse_available() -> None:
    require_fuse()


@pytest.fixture
def mount(tmp_path: Path, fuse_available: None) -> Iterator[Mounter]:
    m = Mounter(tmp_path)
    try:
        yield m
    finally:
        m.close()
