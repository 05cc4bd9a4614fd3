"""Helpers for the migration and proxy tests: real processes, bounded waits, writers."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pynbd.server.control import control_request
from tests.support.workers import serve_args

REPO = Path(__file__).resolve().parents[2]
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() \
    else sys.executable
BLOCK = 64 * 1024


def env_for(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    src = str(REPO / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if extra:
        env.update(extra)
    return env


class Proc:
    """A background process with its output in files; stop() always reaps it."""

    def __init__(self, argv: Sequence[str], workdir: Path, name: str,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.out = workdir / f"{name}.out"
        self.err = workdir / f"{name}.err"
        with open(self.out, "wb") as o, open(self.err, "wb") as e:
            self.proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=o,
                                         stderr=e, env=env_for(env), cwd=workdir,
                                         start_new_session=True)

    def wait_for(self, cond: Any, what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) before "
                                   f"{what}:\n{self.logs()}")
            time.sleep(0.02)
        raise RuntimeError(f"{self.name}: no {what} within {timeout}s:\n{self.logs()}")

    def first_line(self, timeout: float = 20.0) -> str:
        self.wait_for(lambda: self.out.exists() and b"\n" in self.out.read_bytes(),
                      "output line", timeout)
        return self.out.read_bytes().split(b"\n", 1)[0].decode()

    def logs(self) -> str:
        text = ""
        for p in (self.out, self.err):
            with contextlib.suppress(OSError):
                text += p.read_text(errors="replace")[-4000:]
        return text

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.proc.wait(5)


class Procs:
    """Every process a test starts; stopped at teardown."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.all: list[Proc] = []

    @property
    def key(self) -> Path:
        """The test's msgr2 pre-shared key file (made on first use, mode 0600)."""
        path = self.workdir / "migration.psk"
        if not path.exists():
            import base64

            path.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
            os.chmod(path, 0o600)
        return path

    @property
    def psk(self) -> bytes:
        """The key itself, as the CLI reads it from :attr:`key`."""
        return self.key.read_bytes().strip()

    def auth(self) -> list[str]:
        """``--psk-file KEY``: what `pynbd listen` and `pynbd mirror` need to talk."""
        return ["--psk-file", str(self.key)]

    def start(self, argv: Sequence[str], name: str, env: dict[str, str] | None = None) -> Proc:
        p = Proc(argv, self.workdir, name, env)
        self.all.append(p)
        return p

    def pynbd(self, args: Sequence[str], name: str, env: dict[str, str] | None = None) -> Proc:
        return self.start([PY, "-m", "pynbd", *args], name, env)

    def mirror(self, args: Sequence[str], name: str = "mirror") -> Proc:
        """``pynbd mirror --psk-file KEY ARGS...`` in the background."""
        return self.pynbd(["mirror", *self.auth(), *args], name)

    def serve(self, image: Path, name: str = "source", env: dict[str, str] | None = None,
              extra: Sequence[str] = ()) -> tuple[Proc, str, str]:
        """pynbd serve IMAGE on a Unix socket with a control socket: (proc, uri, control)."""
        sock = str(self.workdir / f"{name}.sock")
        ctl = str(self.workdir / f"{name}.ctl")
        p = self.pynbd(["serve", *serve_args([str(image), "--socket", sock, "--control", ctl,
                                              *extra])], name, env)
        uri = p.first_line()
        p.wait_for(lambda: os.path.exists(ctl), "control socket")
        return p, uri, ctl

    def qemu_nbd(self, image: Path, name: str = "qemu") -> tuple[Proc, str]:
        sock = str(self.workdir / f"{name}.sock")
        p = self.start([shutil.which("qemu-nbd") or "qemu-nbd", "-f", "raw", "-k", sock, "-t",
                        "--cache=writeback", "--discard=unmap", str(image)], name)
        p.wait_for(lambda: os.path.exists(sock), "socket")
        return p, f"nbd+unix:///?socket={sock}"

    def nbdkit(self, image: Path, name: str = "nbdkit") -> tuple[Proc, str]:
        sock = str(self.workdir / f"{name}.sock")
        p = self.start([shutil.which("nbdkit") or "nbdkit", "-f", "-U", sock, "file",
                        f"file={image}"], name)
        p.wait_for(lambda: os.path.exists(sock), "socket")
        return p, f"nbd+unix:///?socket={sock}"

    def stop_all(self) -> None:
        for p in reversed(self.all):
            p.stop()


def run_cli(args: Sequence[str], timeout: float = 120.0,
            stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([PY, "-m", "pynbd", *args], input=stdin, capture_output=True,
                          env=env_for(), timeout=timeout, check=False)


def ctl(path: str, req: dict[str, Any]) -> dict[str, Any]:
    return control_request(path, req, timeout=30.0)


def migration_status(path: str) -> dict[str, Any]:
    reply = ctl(path, {"cmd": "status"})
    assert reply["ok"], reply
    m: dict[str, Any] = reply["status"]["migration"]
    return m


def make_sparse_image(path: Path, size: int, seed: int, fraction: float = 0.25) -> None:
    """A sparse image with random-data extents covering about ``fraction`` of it."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        allocated = 0
        while allocated < size * fraction:
            n = rng.randrange(1, 64) * BLOCK
            off = rng.randrange(0, (size - n) // 4096) * 4096
            f.seek(off)
            f.write(rng.randbytes(n))
            allocated += n


def compare_images(a: Path, b: Path, block: int = BLOCK) -> list[int]:
    """Offsets of the blocks that differ (block by block)."""
    bad = []
    with open(a, "rb") as fa, open(b, "rb") as fb:
        off = 0
        while True:
            x = fa.read(block)
            y = fb.read(block)
            if not x and not y:
                break
            if x != y:
                bad.append(off)
            off += block
    return bad


class Writer(threading.Thread):
    """Writes random data at random offsets through the pynbd client until stopped or
    refused; remembers every acknowledged write and the worst write latency."""

    def __init__(self, uri: str, size: int, seed: int, rate: int = 4 * 1024 * 1024,
                 max_len: int = 64 * 1024, retry_errors: bool = False,
                 region: tuple[int, int] | None = None) -> None:
        super().__init__(daemon=True)
        self.uri = uri
        self.size = size
        self.base, end = region if region is not None else (0, size)
        self.span = end - self.base
        self.rng = random.Random(seed)
        self.rate = rate
        self.max_len = max_len
        self.stop_event = threading.Event()
        self.acked: list[tuple[int, bytes]] = []
        self.error: BaseException | None = None
        self.max_latency = 0.0
        #: how long the write that failed (e.g. ESHUTDOWN at handover) waited
        self.error_latency = 0.0
        self.writes = 0
        self.retry_errors = retry_errors

    def run(self) -> None:
        from pynbd.client import connect

        try:
            c = connect(self.uri, timeout=30.0)
        except BaseException as exc:
            self.error = exc
            return
        try:
            start = time.monotonic()
            written = 0
            while not self.stop_event.is_set():
                n = self.rng.randrange(1, self.max_len // 512 + 1) * 512
                off = self.base + self.rng.randrange(0, (self.span - n) // 512 + 1) * 512
                data = self.rng.randbytes(n)
                t0 = time.monotonic()
                try:
                    c.write(off, data)
                except BaseException as exc:
                    self.error = exc
                    self.error_latency = time.monotonic() - t0
                    return
                self.max_latency = max(self.max_latency, time.monotonic() - t0)
                self.acked.append((off, data))
                self.writes += 1
                written += n
                if self.rate:
                    ahead = written / self.rate - (time.monotonic() - start)
                    if ahead > 0:
                        self.stop_event.wait(ahead)
        finally:
            with contextlib.suppress(Exception):
                c.hard_close()

    def check_in(self, image: Path) -> list[int]:
        """Offsets of acknowledged writes whose latest data is not in ``image``."""
        latest: dict[int, bytearray] = {}
        # replay in order into a sparse overlay of 512-byte sectors
        for off, data in self.acked:
            for i in range(0, len(data), 512):
                latest[off + i] = bytearray(data[i:i + 512])
        bad = []
        with open(image, "rb") as f:
            for off in sorted(latest):
                f.seek(off)
                if f.read(512) != latest[off]:
                    bad.append(off)
        return bad


def stepped_down_error(exc: BaseException | None) -> bool:
    """None, or the error a writer sees when its server stepped down (ESHUTDOWN, then
    the connection is dropped)."""
    if exc is None:
        return True
    text = repr(exc)
    return "ESHUTDOWN" in text or "stepped down" in text or isinstance(
        exc, (ConnectionError, EOFError)) or "closed" in text.lower()


def listen(procs: Procs, image: Path, name: str = "dest", env: dict[str, str] | None = None,
           extra: Sequence[str] = (), auth: Sequence[str] | None = None,
           port: int | str = 0) -> tuple[Proc, str, str, str]:
    """pynbd listen IMAGE: (proc, msgr2 uri, control path, NBD uri served after commit).
    Authenticated with the test's key (``procs.auth()``) unless ``auth`` says otherwise."""
    ctl_path = str(procs.workdir / f"{name}.ctl")
    nbd_sock = str(procs.workdir / f"{name}-nbd.sock")
    if auth is None:
        auth = procs.auth()
    p = procs.pynbd(["listen", str(image), "--bind", "127.0.0.1", "--port", str(port),
                     "--control", ctl_path, "--serve-socket", nbd_sock, *auth, *extra], name,
                    env)
    uri = p.first_line()
    p.wait_for(lambda: os.path.exists(ctl_path), "control socket")
    return p, uri, ctl_path, f"nbd+unix:///?socket={nbd_sock}"


def sparse_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def poll_until_exit(proc: Proc, ctl_path: str, timeout: float = 120.0) -> list[dict[str, Any]]:
    """Poll the source's migration status until ``proc`` exits; every sample."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while proc.proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            seen.append(migration_status(ctl_path))
        time.sleep(0.05)
    return seen
