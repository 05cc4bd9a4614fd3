"""``pynbd serve`` as a subprocess for tests (on :class:`tests.support.processes.Process`).

The server prints its URI(s) on stdout (first line first) and logs to stderr; we wait
for the first line with a bounded timeout and stop it with SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from tests.support.processes import REPO, START_TIMEOUT, Process, pynbd_argv, wait_until
from tests.support.workers import serve_args

__all__ = ["REPO", "PynbdServer", "ServerFactory", "free_unix_path", "unix_uri_path",
           "wait_until"]


class PynbdServer:
    """A running ``pynbd serve ARGS`` (the suite's ``--workers`` added)."""

    def __init__(self, args: Sequence[str], *, cwd: str | os.PathLike[str] | None = None,
                 timeout: float = START_TIMEOUT) -> None:
        self.args = pynbd_argv("serve", *serve_args(args))
        self.process = Process(self.args, name="pynbd-serve", cwd=cwd)
        self.proc = self.process.proc
        try:
            self.process.wait_line(lambda x: bool(x.strip()), "URI", timeout)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"pynbd serve did not print a URI within {timeout}s "
                               f"(rc={self.proc.returncode}): {self.stderr[-2000:]}") from exc

    @property
    def uris(self) -> list[str]:
        """The URIs printed so far (one a line)."""
        return [x.strip() for x in self.process.lines() if x.strip()]

    @property
    def uri(self) -> str:
        return self.uris[0]

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stderr(self) -> str:
        return self.process.stderr

    @property
    def port(self) -> int:
        """TCP port of the first ``nbd://`` URI (waits briefly: URIs are printed one
        line at a time)."""
        return int(self.uri_for("nbd://").split("/")[2].rsplit(":", 1)[1])

    def uri_for(self, prefix: str, timeout: float = 5.0) -> str:
        """The first URI starting with ``prefix`` (``nbd://``, ``nbd+unix://``)."""
        def find() -> str | None:
            return next((u for u in self.uris if u.startswith(prefix)), None)

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
        return self.process.alive()

    def stop(self) -> None:
        self.process.stop()

    def __enter__(self) -> PynbdServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
