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
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: every wait in these tests is bounded by this
TIMEOUT = 30.0


def _python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(REPO / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


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
    r = subprocess.run([_python(), "-c", "import pynbd.fuse.mount as m; m.load_binding()"],
                       capture_output=True, text=True, timeout=60, env=_env(), check=False)
    if r.returncode != 0:
        problems.append(f"the FUSE binding does not load: {r.stderr.strip()[-500:]} "
                        "(pip install -e '.[test]' installs mfusepy)")
    if problems:
        pytest.fail("pynbd fuse cannot run here: " + "; ".join(problems), pytrace=False)


class FuseMount:
    """A running ``pynbd fuse URI MOUNTPOINT`` process."""

    def __init__(self, uri: str, mountpoint: Path, *args: str, wait: bool = True) -> None:
        self.mountpoint = mountpoint
        self.argv = [_python(), "-m", "pynbd", "fuse", *args, uri, str(mountpoint)]
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=_env())
        self.lines: list[str] = []
        self._err: list[bytes] = []
        self._ready = threading.Event()
        self._t_out = threading.Thread(target=self._read_out, daemon=True)
        self._t_err = threading.Thread(target=self._read_err, daemon=True)
        self._t_out.start()
        self._t_err.start()
        if wait:
            self.wait_ready()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.decode("utf-8", "replace").rstrip("\n"))
            self._ready.set()
        self._ready.set()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._err.append(line)

    def wait_ready(self) -> None:
        if not self._ready.wait(TIMEOUT) or not self.lines:
            self.stop()
            raise RuntimeError(f"pynbd fuse did not become ready (rc={self.proc.returncode}):"
                               f"\n{self.stderr}")

    @property
    def path(self) -> str:
        """The file the export appears as (printed by pynbd fuse when ready)."""
        return self.lines[0]

    @property
    def stderr(self) -> str:
        return b"".join(self._err).decode("utf-8", "replace")

    def wait(self, timeout: float = TIMEOUT) -> int:
        rc = self.proc.wait(timeout)
        self._t_err.join(5)
        self._t_out.join(5)
        return rc

    def signal(self, sig: int = signal.SIGTERM, timeout: float = TIMEOUT) -> int:
        self.proc.send_signal(sig)
        return self.wait(timeout)

    def stop(self) -> None:
        """Teardown: stop the process for sure and leave nothing mounted."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        force_unmount(self.mountpoint)
        if self.proc.poll() is None:  # was blocked on the mount
            self.proc.kill()
            self.proc.wait(15)
        for t in (self._t_out, self._t_err):
            t.join(5)


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
