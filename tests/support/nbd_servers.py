"""Start real NBD servers for tests: nbdkit, qemu-nbd, nbd-server and pynbd serve.

Every server listens on a dynamically chosen loopback port (or a Unix socket in a
temporary directory), readiness is awaited with a bounded number of connection
attempts, and :meth:`Server.stop` stops and reaps the process (a
:class:`tests.support.processes.Process`). A missing program is an error (tests fail
loudly), never a skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.net import activation_argv, free_port, listening_socket
from tests.support.processes import REPO, Process, pynbd_argv, pynbd_env, run_pynbd
from tests.support.workers import serve_args

READY_TIMEOUT = 20.0
TRANSPORTS = ("tcp", "tcp6", "unix")


def require(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise RuntimeError(f"{program} is not installed (install the Debian package)")
    return path


@dataclass
class Server:
    kind: str
    process: Process
    workdir: Path
    transport: str
    export: str = ""
    host: str | None = None
    port: int | None = None
    socket_path: str | None = None
    tls_dir: Path | None = None
    extra_pids: list[int] = field(default_factory=list)
    daemon: bool = False

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.process.proc

    def uri(self, export: str | None = None, tls: bool | None = None, **params: str) -> str:
        from urllib.parse import quote
        export = self.export if export is None else export
        tls = (self.tls_dir is not None) if tls is None else tls
        if tls and "tls-certificates" not in params and self.tls_dir is not None:
            params["tls-certificates"] = str(self.tls_dir)
        if self.transport == "unix":
            assert self.socket_path is not None
            q = {"socket": self.socket_path, **params}
            scheme = "nbds+unix" if tls else "nbd+unix"
            query = "&".join(f"{k}={quote(v, safe='/')}" for k, v in q.items())
            return f"{scheme}:///{quote(export)}?{query}"
        assert self.host is not None and self.port is not None
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "nbds" if tls else "nbd"
        out = f"{scheme}://{host}:{self.port}/{quote(export)}"
        if params:
            out += "?" + "&".join(f"{k}={quote(v, safe='/')}" for k, v in params.items())
        return out

    def stop(self) -> None:
        for pid in self.extra_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            for _ in range(200):  # bounded wait for the daemon to go away
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.extra_pids = []
        self.process.stop()

    def logs(self) -> str:
        return self.process.logs()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _listen_args(transport: str, workdir: Path) -> tuple[str | None, int | None, str | None]:
    if transport == "unix":
        return None, None, str(workdir / "nbd.sock")
    host = "::1" if transport == "tcp6" else "127.0.0.1"
    return host, free_port(host), None


def wait_ready(srv: Server, timeout: float = READY_TIMEOUT) -> None:
    """Until the server greets a connection (bounded); stops it and raises if not."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    for _ in range(int(timeout / 0.05) + 1):
        if not srv.daemon and srv.proc.poll() is not None:
            raise RuntimeError(f"{srv.kind} exited with {srv.proc.returncode}:\n{srv.logs()}")
        try:
            if srv.socket_path is not None:
                if os.path.exists(srv.socket_path):
                    with socket.socket(socket.AF_UNIX) as s:
                        s.settimeout(2)
                        s.connect(srv.socket_path)
                        if s.recv(8):  # greeting starts: server is ready
                            return
            else:
                assert srv.host is not None and srv.port is not None
                with socket.create_connection((srv.host, srv.port), timeout=2) as s:
                    if s.recv(8):
                        return
        except OSError as exc:
            last = exc
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    srv.stop()
    raise RuntimeError(f"{srv.kind} not ready after {timeout}s ({last}):\n{srv.logs()}")


def _spawn(kind: str, argv: Sequence[str], workdir: Path, transport: str, host: str | None,
           port: int | None, sock: str | None, export: str, tls_dir: Path | None,
           env: Mapping[str, str] | None = None,
           listener: socket.socket | None = None) -> Server:
    try:
        pass_fds: tuple[int, ...] = ()
        if listener is not None:
            # systemd socket activation: the test binds port 0 itself (no race for a free
            # port) and hands the listening socket over as fd 3 with LISTEN_FDS/LISTEN_PID
            pass_fds = (listener.fileno(),)
            argv = activation_argv(sys.executable, listener.fileno(), list(argv))
        proc = Process(argv, name=kind, cwd=workdir, env=env or os.environ, pass_fds=pass_fds)
    finally:
        if listener is not None:
            listener.close()  # the server owns it now
    srv = Server(kind, proc, workdir, transport, export, host, port, sock, tls_dir)
    wait_ready(srv)
    return srv


def _bind_zero(transport: str) -> tuple[socket.socket, str, int]:
    host = "::1" if transport == "tcp6" else "127.0.0.1"
    s, port = listening_socket(host)
    return s, host, port


def start_nbdkit(workdir: Path, plugin: str = "memory", plugin_args: Sequence[str] = (
        "size=64M",), *, transport: str = "tcp", tls_dir: Path | None = None,
        read_only: bool = False, export: str = "", extra: Sequence[str] = (),
        filters: Sequence[str] = ()) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    listener = None
    host: str | None = None
    port: int | None = None
    sock: str | None = None
    argv = [require("nbdkit"), "-f"]
    if transport == "unix":
        sock = str(workdir / "nbd.sock")
        argv += ["-U", sock]
    else:
        listener, host, port = _bind_zero(transport)
    if tls_dir is not None:
        argv += ["--tls=require", f"--tls-certificates={tls_dir}"]
    if read_only:
        argv.append("-r")
    if export:
        argv += ["-e", export]
    for f in filters:
        argv += ["--filter", f]
    argv += list(extra)
    argv += [plugin, *plugin_args]
    return _spawn("nbdkit", argv, workdir, transport, host, port, sock, export, tls_dir,
                  listener=listener)


def start_qemu_nbd(workdir: Path, image: Path, *, transport: str = "tcp",
                   tls_dir: Path | None = None, read_only: bool = False, export: str = "",
                   fmt: str = "raw", shared: int = 16, extra: Sequence[str] = ()) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    listener = None
    host: str | None = None
    port: int | None = None
    sock: str | None = None
    argv = [require("qemu-nbd"), "-f", fmt, "-t", "-e", str(shared), "-x", export]
    if transport == "unix":
        sock = str(workdir / "nbd.sock")
        argv += ["-k", sock]
    else:
        listener, host, port = _bind_zero(transport)
    if tls_dir is not None:
        argv += ["--object", f"tls-creds-x509,id=tls0,dir={tls_dir},endpoint=server,"
                 "verify-peer=off", "--tls-creds", "tls0"]
    if read_only:
        argv.append("-r")
    argv += list(extra)
    argv.append(str(image))
    return _spawn("qemu-nbd", argv, workdir, transport, host, port, sock, export, tls_dir,
                  listener=listener)


def start_nbd_server(workdir: Path, image: Path, *, transport: str = "tcp",
                     read_only: bool = False, export: str = "disk") -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    host, port, sock = _listen_args(transport, workdir)
    conf = workdir / "nbd-server.conf"
    lines = ["[generic]", "  allowlist = true"]
    if sock:
        lines += [f"  unixsock = {sock}"]
    else:
        lines += [f"  listenaddr = {host}", f"  port = {port}"]
    lines += [f"[{export}]", f"  exportname = {image}"]
    if read_only:
        lines.append("  readonly = true")
    conf.write_text("\n".join(lines) + "\n")
    pidfile = workdir / "nbd-server.pid"
    # nbd-server forks a child per client only when it runs as a daemon (-d serves one
    # client and exits), so let it daemonize and track the daemon through its pid file.
    argv = [require("nbd-server"), "-C", str(conf), "-p", str(pidfile)]
    proc = Process(argv, name="nbd-server", cwd=workdir, env=os.environ)
    try:
        rc = proc.wait(READY_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.stop()
        raise RuntimeError(f"nbd-server did not daemonize:\n{proc.logs()}") from None
    if rc != 0:
        raise RuntimeError(f"nbd-server failed with {rc}: {proc.logs()}")
    pid = 0
    for _ in range(int(READY_TIMEOUT / 0.05)):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
        if pid:
            break
        time.sleep(0.05)
    if not pid:
        raise RuntimeError("nbd-server wrote no pid file")
    srv = Server("nbd-server", proc, workdir, transport, export, host, port, sock, None,
                 [pid], daemon=True)
    wait_ready(srv)
    return srv


def pynbd_serve_available() -> bool:
    return run_pynbd("serve", "--help", cwd=REPO, timeout=60,
                     python=sys.executable).returncode == 0


def start_pynbd(workdir: Path, target: str = "memory:64M", *, transport: str = "tcp",
                read_only: bool = False, export: str = "", extra: Sequence[str] = ()) -> Server:
    """``pynbd serve``; over TCP it binds port 0 itself and the port is read from the URI
    it prints on stdout (no free-port race)."""
    from urllib.parse import urlsplit

    workdir.mkdir(parents=True, exist_ok=True)
    host, _, sock = _listen_args(transport, workdir)
    args: list[str] = []
    if sock:
        args += ["--socket", sock]
    else:
        args += ["--bind", str(host), "--port", "0"]
    if read_only:
        args.append("--read-only")
    if export:
        args += ["--export-name", export]
    args += [*extra, target]
    argv = pynbd_argv("serve", *serve_args(args), python=sys.executable)
    if sock:
        return _spawn("pynbd", argv, workdir, transport, None, None, sock, export, None,
                      env=pynbd_env())
    proc = Process(argv, name="pynbd", cwd=workdir)
    srv = Server("pynbd", proc, workdir, transport, export, host)
    try:
        line = proc.wait_line(lambda x: "://" in x, "URI", READY_TIMEOUT)
    except RuntimeError:
        srv.stop()
        raise
    srv.port = urlsplit(line.strip()).port
    if not srv.port:
        srv.stop()
        raise RuntimeError(f"pynbd serve printed no port: {line!r}\n{srv.logs()}")
    wait_ready(srv)
    return srv


@contextlib.contextmanager
def running(srv: Server) -> Iterator[Server]:
    try:
        yield srv
    finally:
        srv.stop()
