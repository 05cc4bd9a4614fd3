"""Start ``pynbd serve`` as a subprocess for tests, and stop it for sure.

The server prints its URI(s) on stdout (first line first) and logs to stderr; we wait
for the first line with a bounded timeout, keep reading stdout/stderr in background
threads (so a chatty server never blocks on a full pipe), and stop it with SIGTERM,
then SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from tests.support.workers import serve_args

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 20.0


def _python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


class PynbdServer:
    """A running ``pynbd serve`` process."""

    def __init__(self, args: Sequence[str], *, cwd: str | os.PathLike[str] | None = None,
                 timeout: float = START_TIMEOUT) -> None:
        env = dict(os.environ)
        src = str(REPO / "src")
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.args = [_python(), "-m", "pynbd", "serve", *serve_args(args)]
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     cwd=cwd, env=env)
        self.uris: list[str] = []
        self._stderr: list[bytes] = []
        self._first = threading.Event()
        self._t_out = threading.Thread(target=self._read_stdout, daemon=True)
        self._t_err = threading.Thread(target=self._read_stderr, daemon=True)
        self._t_out.start()
        self._t_err.start()
        if not self._first.wait(timeout) or not self.uris:
            self.stop()
            raise RuntimeError(f"pynbd serve did not print a URI within {timeout}s "
                               f"(rc={self.proc.returncode}): {self.stderr[-2000:]}")

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            text = line.decode("utf-8", "replace").strip()
            if text:
                self.uris.append(text)
                self._first.set()
        self._first.set()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)

    @property
    def uri(self) -> str:
        return self.uris[0]

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stderr(self) -> str:
        return b"".join(self._stderr).decode("utf-8", "replace")

    @property
    def port(self) -> int:
        """TCP port of the first ``nbd://`` URI (waits briefly: URIs are printed one
        line at a time)."""
        return int(self.uri_for("nbd://").split("/")[2].rsplit(":", 1)[1])

    def uri_for(self, prefix: str, timeout: float = 5.0) -> str:
        """The first URI starting with ``prefix`` (``nbd://``, ``nbd+unix://``)."""
        def find() -> str | None:
            return next((u for u in list(self.uris) if u.startswith(prefix)), None)

        wait_until(lambda: find() is not None, timeout)
        u = find()
        if u is None:
            raise ValueError(f"no {prefix} URI in {self.uris}")
        return u

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for t in (self._t_out, self._t_err):
            if t.is_alive():
                t.join(5)

    def __enter__(self) -> PynbdServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_until(pred, timeout: float = 10.0, interval: float = 0.02) -> bool:  # type: ignore[no-untyped-def]
    """Poll ``pred`` until it is true or ``timeout`` passes (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


def free_unix_path(tmp_path: Path, name: str = "nbd.sock") -> str:
    """A Unix socket path short enough for sun_path (108 bytes)."""
    p = str(tmp_path / name)
    if len(p) < 100:
        return p
    import tempfile

    return os.path.join(tempfile.mkdtemp(prefix="pynbd-"), name)


class ServerFactory:
    """Starts servers on demand; the fixture stops every one of them."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.servers: list[PynbdServer] = []

    def __call__(self, *args: str, tcp: bool = True, bind: str = "127.0.0.1",
                 unix: bool = False) -> PynbdServer:
        argv: list[str] = ["-v"]
        if tcp:
            argv += ["--bind", bind, "--port", "0"]
        if unix:
            argv += ["--socket", free_unix_path(self.tmp_path, f"nbd{len(self.servers)}.sock")]
        argv += list(args)
        srv = PynbdServer(argv, cwd=self.tmp_path)
        self.servers.append(srv)
        return srv

    def close(self) -> None:
        for s in self.servers:
            s.stop()


def unix_uri_path(uri: str) -> str:
    """The socket path of an ``nbd+unix:///...?socket=PATH`` URI."""
    from urllib.parse import parse_qs, unquote, urlsplit

    q = parse_qs(urlsplit(uri).query)
    return unquote(q["socket"][0])
