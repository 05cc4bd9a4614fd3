"""Start real NBD servers for tests: nbdkit, qemu-nbd, nbd-server and pynbd serve.

Every server listens on a dynamically chosen loopback port (or a Unix socket in a
temporary directory), readiness is awaited with a bounded number of connection
attempts, and :meth:`Server.stop` kills and reaps the process. A missing program is an
error (tests fail loudly), never a skip.
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.workers import serve_args

READY_TIMEOUT = 20.0
TRANSPORTS = ("tcp", "tcp6", "unix")

REPO = Path(__file__).resolve().parents[2]


def require(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise RuntimeError(f"{program} is not installed (install the Debian package)")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    kind: str
    proc: subprocess.Popen[bytes]
    workdir: Path
    transport: str
    export: str = ""
    host: str | None = None
    port: int | None = None
    socket_path: str | None = None
    tls_dir: Path | None = None
    log: Path | None = None
    extra_pids: list[int] = field(default_factory=list)
    daemon: bool = False

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
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def logs(self) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")[-4000:]

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _listen_args(transport: str, workdir: Path) -> tuple[str | None, int | None, str | None]:
    if transport == "unix":
        return None, None, str(workdir / "nbd.sock")
    host = "::1" if transport == "tcp6" else "127.0.0.1"
    return host, free_port(host), None


def _wait_ready(srv: Server, timeout: float = READY_TIMEOUT) -> None:
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
           env: dict[str, str] | None = None,
           listener: socket.socket | None = None) -> Server:
    log = workdir / f"{kind}.log"
    logf = open(log, "ab")
    try:
        if listener is not None:
            # systemd socket activation: the test binds port 0 itself (no race for a free
            # port) and hands the listening socket over as fd 3 with LISTEN_FDS/LISTEN_PID
            fd = listener.fileno()
            argv = [sys.executable, "-c", _ACTIVATE, str(fd), *argv]
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                    cwd=workdir, env=env, pass_fds=(fd,))
        else:
            proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=logf, cwd=workdir, env=env)
    finally:
        logf.close()
        if listener is not None:
            listener.close()  # the server owns it now
    srv = Server(kind, proc, workdir, transport, export, host, port, sock, tls_dir, log)
    _wait_ready(srv)
    return srv


_ACTIVATE = (
    "import os, sys\n"
    "fd = int(sys.argv[1])\n"
    "os.dup2(fd, 3)\n"
    "if fd != 3: os.close(fd)\n"
    "os.environ['LISTEN_FDS'] = '1'\n"
    "os.environ['LISTEN_PID'] = str(os.getpid())\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def _bind_zero(transport: str) -> tuple[socket.socket, str, int]:
    host = "::1" if transport == "tcp6" else "127.0.0.1"
    family = socket.AF_INET6 if transport == "tcp6" else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind((host, 0))
    s.listen(64)
    return s, host, s.getsockname()[1]


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
    log = workdir / "nbd-server.log"
    with open(log, "ab") as logf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                cwd=workdir)
    rc = proc.wait(timeout=READY_TIMEOUT)
    if rc != 0:
        raise RuntimeError(f"nbd-server failed with {rc}: {log.read_text(errors='replace')}")
    pid = 0
    for _ in range(int(READY_TIMEOUT / 0.05)):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
        if pid:
            break
        time.sleep(0.05)
    if not pid:
        raise RuntimeError("nbd-server wrote no pid file")
    srv = Server("nbd-server", proc, workdir, transport, export, host, port, sock, None, log,
                 [pid], daemon=True)
    _wait_ready(srv)
    return srv


def pynbd_serve_available() -> bool:
    r = subprocess.run([sys.executable, "-m", "pynbd", "serve", "--help"], cwd=REPO,
                       capture_output=True, timeout=60, check=False)
    return r.returncode == 0


def start_pynbd(workdir: Path, target: str = "memory:64M", *, transport: str = "tcp",
                read_only: bool = False, export: str = "", extra: Sequence[str] = ()) -> Server:
    """``pynbd serve``; over TCP it binds port 0 itself and the port is read from the URI
    it prints on stdout (no free-port race)."""
    workdir.mkdir(parents=True, exist_ok=True)
    host, _, sock = _listen_args(transport, workdir)
    port: int | None = 0
    argv = [sys.executable, "-m", "pynbd", "serve"]
    if sock:
        argv += ["--socket", sock]
    else:
        argv += ["--bind", str(host), "--port", "0"]
    if read_only:
        argv.append("--read-only")
    if export:
        argv += ["--export-name", export]
    argv += [*extra, target]
    argv = argv[:4] + serve_args(argv[4:])
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    if sock:
        return _spawn("pynbd", argv, workdir, transport, None, None, sock, export, None, env)
    log = workdir / "pynbd.log"
    out = workdir / "pynbd.stdout"
    with open(log, "ab") as logf, open(out, "wb") as outf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=outf, stderr=logf,
                                cwd=workdir, env=env)
    srv = Server("pynbd", proc, workdir, transport, export, host, None, None, None, log)
    from urllib.parse import urlsplit
    for _ in range(int(READY_TIMEOUT / 0.05)):
        text = out.read_text(errors="replace") if out.exists() else ""
        line = next((x for x in text.splitlines() if "://" in x), None)
        if line is not None:
            port = urlsplit(line.strip()).port
            break
        if proc.poll() is not None:
            raise RuntimeError(f"pynbd serve exited with {proc.returncode}:\n{srv.logs()}")
        time.sleep(0.05)
    if not port:
        srv.stop()
        raise RuntimeError(f"pynbd serve printed no URI:\n{srv.logs()}")
    srv.port = port
    _wait_ready(srv)
    return srv


def make_image(path: Path, size: int, data: Sequence[tuple[int, bytes]] = ()) -> Path:
    """A sparse raw image of ``size`` bytes with ``data`` written at given offsets."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, blob in data:
            f.seek(off)
            f.write(blob)
    return path


@contextlib.contextmanager
def running(srv: Server) -> Iterator[Server]:
    try:
        yield srv
    finally:
        srv.stop()
