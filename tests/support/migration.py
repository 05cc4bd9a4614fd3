"""The processes of a live migration, for tests and benchmarks: ``pynbd serve`` with a
control socket, ``pynbd listen``, ``pynbd mirror``, qemu-nbd and nbdkit as plain NBD
targets (each a :class:`tests.support.processes.Process`), and a client that writes
while a migration runs. Used by tests/migration, tests/proxy and bench/bench_migration.py.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from tests.support.processes import Process, pynbd_argv, pynbd_env
from tests.support.workers import serve_args


class Procs:
    """Every process a test starts; stopped at teardown."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.all: list[Process] = []

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

    def start(self, argv: Sequence[str], name: str,
              env: dict[str, str] | None = None) -> Process:
        """``argv`` in its own session, in the work directory, its output in NAME.out and
        NAME.err there; ``env`` adds to :func:`pynbd_env`."""
        p = Process(argv, name=name, cwd=self.workdir, env=pynbd_env(env),
                    log_dir=self.workdir, new_session=True, stop_timeout=5.0)
        self.all.append(p)
        return p

    def pynbd(self, args: Sequence[str], name: str,
              env: dict[str, str] | None = None) -> Process:
        return self.start(pynbd_argv(*args), name, env)

    def mirror(self, args: Sequence[str], name: str = "mirror") -> Process:
        """``pynbd mirror --psk-file KEY ARGS...`` in the background."""
        return self.pynbd(["mirror", *self.auth(), *args], name)

    def serve(self, image: Path, name: str = "source", env: dict[str, str] | None = None,
              extra: Sequence[str] = ()) -> tuple[Process, str, str]:
        """pynbd serve IMAGE on a Unix socket with a control socket: (proc, uri, control)."""
        sock = str(self.workdir / f"{name}.sock")
        ctl = str(self.workdir / f"{name}.ctl")
        p = self.pynbd(["serve", *serve_args([str(image), "--socket", sock, "--control", ctl,
                                              *extra])], name, env)
        uri = p.first_line()
        p.wait_for(lambda: os.path.exists(ctl), "control socket")
        return p, uri, ctl

    def qemu_nbd(self, image: Path, name: str = "qemu") -> tuple[Process, str]:
        sock = str(self.workdir / f"{name}.sock")
        p = self.start([shutil.which("qemu-nbd") or "qemu-nbd", "-f", "raw", "-k", sock, "-t",
                        "--cache=writeback", "--discard=unmap", str(image)], name)
        p.wait_for(lambda: os.path.exists(sock), "socket")
        return p, f"nbd+unix:///?socket={sock}"

    def nbdkit(self, image: Path, name: str = "nbdkit") -> tuple[Process, str]:
        sock = str(self.workdir / f"{name}.sock")
        p = self.start([shutil.which("nbdkit") or "nbdkit", "-f", "-U", sock, "file",
                        f"file={image}"], name)
        p.wait_for(lambda: os.path.exists(sock), "socket")
        return p, f"nbd+unix:///?socket={sock}"

    def stop_all(self) -> None:
        for p in reversed(self.all):
            p.stop()


def listen(procs: Procs, image: Path, name: str = "dest", env: dict[str, str] | None = None,
           extra: Sequence[str] = (), auth: Sequence[str] | None = None,
           port: int | str = 0) -> tuple[Process, str, str, str]:
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
