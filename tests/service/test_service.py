"""Running as a service (issue 16): systemd socket activation and readiness, captive
mode (--run), --exit-with-parent, --pidfile, --exit-when-idle, operator logs. Driven
with real programs: systemd-socket-activate (Debian's systemd), nbdinfo, qemu-io,
qemu-img."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").exists() else sys.executable
MiB = 1024 * 1024


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO / "src") + os.pathsep + e.get("PYTHONPATH", "")
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(*cmd: str, timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                          env=env(), **kw)  # type: ignore[call-overload]


def wait_for(pred, what: str, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def stop(p: subprocess.Popen[bytes]) -> int:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
    return p.returncode


@pytest.mark.parametrize("workers", ["1", "2"])
def test_socket_activation_tcp_and_unix(tmp_path: Path, workers: str) -> None:
    port = free_port()
    sock = str(tmp_path / "act.sock")
    log = tmp_path / "log"
    with open(log, "wb") as logf:
        p = subprocess.Popen(["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "-l", sock,
                              "--fdname=tcp:unix", "-E", "PYTHONPATH", PY, "-m", "pynbd",
                              "serve", "--workers", workers, "memory:16M"],
                             stdout=logf, stderr=subprocess.STDOUT, env=env())
    try:
        wait_for(lambda: os.path.exists(sock), "the activation socket")
        # the first connection starts pynbd serve, which takes both sockets over
        r = run("nbdinfo", "--size", f"nbd://127.0.0.1:{port}/")
        assert r.returncode == 0 and r.stdout.strip() == str(16 * MiB), r.stderr
        r = run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k",
                f"nbd+unix:///?socket={sock}")
        assert r.returncode == 0, r.stderr
        r = run("qemu-io", "-f", "raw", "-c", "read -P 0x5a 1M 64k",
                f"nbd://127.0.0.1:{port}/")
        assert r.returncode == 0 and "read 65536/65536" in r.stdout, r.stdout + r.stderr
        text = log.read_text()
        assert "socket-activated listener tcp" in text and "socket-activated listener unix" in text
    finally:
        assert stop(p) == 0
    assert os.path.exists(sock), "an inherited Unix socket is systemd's to remove"


def test_socket_activation_refuses_explicit_listen_flags(tmp_path: Path) -> None:
    port = free_port()
    p = subprocess.Popen(["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "-E",
                          "PYTHONPATH", PY, "-m", "pynbd", "serve", "--port", "10999",
                          "memory:1M"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         env=env())
    try:
        def connected() -> bool:  # the first connection makes it exec pynbd serve
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            except OSError:
                return False
            return True

        wait_for(connected, "the activation socket")
        assert p.wait(20) == 2
        assert p.stdout is not None
        assert b"socket-activated (LISTEN_FDS)" in p.stdout.read()
    finally:
        stop(p)


def test_ready_and_stopping_notifications(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    n = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    n.bind(path)
    n.settimeout(30)
    e = env()
    e["NOTIFY_SOCKET"] = path
    p = subprocess.Popen([PY, "-m", "pynbd", "serve", "--port", "0", "memory:1M"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=e)
    try:
        msg = n.recv(4096).decode()
        assert "READY=1" in msg and f"MAINPID={p.pid}" in msg and "STATUS=serving" in msg
        p.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in n.recv(4096).decode()
        assert p.wait(20) == 0
    finally:
        stop(p)
        n.close()


def test_run_passes_the_uri_and_the_exit_status(tmp_path: Path) -> None:
    out = tmp_path / "vars"
    r = run(PY, "-m", "pynbd", "serve", "--run",
            f'nbdinfo --size "$uri" > {out}; echo "$unixsocket|$port|$exportname|$tls" >> {out}; '
            "exit 7", "memory:16M")
    assert r.returncode == 7, r.stderr
    size, rest = out.read_text().splitlines()
    assert size == str(16 * MiB)
    unixsocket, port, export, tls = rest.split("|")
    assert unixsocket.endswith("nbd.sock") and port == "" and export == "" and tls == "0"
    assert not os.path.exists(unixsocket), "the private socket is removed at exit"


def test_run_qemu_img_convert(tmp_path: Path) -> None:
    src = tmp_path / "disk.img"
    src.write_bytes(os.urandom(MiB) + bytes(3 * MiB))
    dst = tmp_path / "out.qcow2"
    r = run(PY, "-m", "pynbd", "serve", "--run",
            f'qemu-img convert -O qcow2 "$uri" {dst}', str(src), timeout=120)
    assert r.returncode == 0, r.stderr
    back = tmp_path / "back.raw"
    r = run("qemu-img", "convert", "-O", "raw", str(dst), str(back))
    assert r.returncode == 0, r.stderr
    assert back.read_bytes() == src.read_bytes()


def test_run_on_a_tcp_port_sets_port(tmp_path: Path) -> None:
    out = tmp_path / "port"
    r = run(PY, "-m", "pynbd", "serve", "--bind", "127.0.0.1", "--port", "0", "--run",
            f'echo "$port $uri" > {out}; nbdinfo --size "$uri" >> {out}', "memory:1M")
    assert r.returncode == 0, r.stderr
    first, size = out.read_text().splitlines()
    port, uri = first.split()
    assert int(port) > 0 and uri == f"nbd://127.0.0.1:{port}/" and size == str(MiB)


def test_exit_with_parent(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    parent = subprocess.Popen(
        ["/bin/sh", "-c", f"{PY} -m pynbd serve --port 0 --exit-with-parent "
                          f"--pidfile {pidfile} memory:1M > /dev/null 2>&1 & sleep 300"],
        env=env())
    try:
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), "the pid file")
        pid = int(pidfile.read_text())
        os.kill(pid, 0)
        parent.kill()
        parent.wait(10)

        def gone() -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        wait_for(gone, "the server to exit with its parent", 30)
    finally:
        if parent.poll() is None:
            parent.kill()


def test_pidfile_lifecycle(tmp_path: Path) -> None:
    pidfile = tmp_path / "pynbd.pid"
    p = subprocess.Popen([PY, "-m", "pynbd", "serve", "--port", "0", "--pidfile",
                          str(pidfile), "memory:1M"], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, env=env())
    try:
        assert p.stdout is not None
        p.stdout.readline()
        wait_for(pidfile.exists, "the pid file")
        assert pidfile.read_text().strip() == str(p.pid)
    finally:
        assert stop(p) == 0
    assert not pidfile.exists()


def test_exit_when_idle(tmp_path: Path) -> None:
    p = subprocess.Popen([PY, "-m", "pynbd", "serve", "--port", "0", "--exit-when-idle", "2",
                          "memory:1M"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=env())
    try:
        assert p.stdout is not None
        uri = p.stdout.readline().decode().strip()
        r = run("nbdinfo", "--size", uri)
        assert r.returncode == 0
        assert p.wait(60) == 0
        assert p.stderr is not None
        assert b"--exit-when-idle" in p.stderr.read()
    finally:
        stop(p)


def test_logs_one_line_per_client_and_json(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with open(log, "wb") as logf:
        p = subprocess.Popen([PY, "-m", "pynbd", "serve", "--port", "0", "--log-format", "json",
                              "--export-name", "disk", "memory:1M"], stdout=subprocess.PIPE,
                             stderr=logf, env=env())
    try:
        assert p.stdout is not None
        uri = p.stdout.readline().decode().strip()
        r = run("qemu-io", "-f", "raw", "-c", "write 0 4k", uri)
        assert r.returncode == 0, r.stderr
    finally:
        stop(p)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    events = [r for r in records if r.get("logger") == "pynbd.access"]
    assert [e["event"] for e in events] == ["connect", "disconnect"]
    assert all(e["export"] == "disk" and e["peer"].startswith("127.0.0.1:") for e in events)
    assert events[1]["bytes_written"] == 4096 and events[1]["reason"] == "NBD_CMD_DISC"
    assert all({"time", "level", "pid", "message"} <= set(r) for r in records)


def test_debug_logs_every_request(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with open(log, "wb") as logf:
        p = subprocess.Popen([PY, "-m", "pynbd", "serve", "-vv", "--port", "0", "--workers",
                              "2", "memory:1M"], stdout=subprocess.PIPE, stderr=logf,
                             env=env())
    try:
        assert p.stdout is not None
        uri = p.stdout.readline().decode().strip()
        r = run("qemu-io", "-f", "raw", "-c", "write 8192 4k", "-c", "read 8192 4k", uri)
        assert r.returncode == 0, r.stderr
    finally:
        stop(p)
    text = log.read_text()
    assert "WRITE offset 8192 length 4096" in text and "READ offset 8192 length 4096" in text
    default = tmp_path / "default"
    with open(default, "wb") as logf:
        p = subprocess.Popen([PY, "-m", "pynbd", "serve", "--port", "0", "memory:1M"],
                             stdout=subprocess.PIPE, stderr=logf, env=env())
    try:
        assert p.stdout is not None
        uri = p.stdout.readline().decode().strip()
        assert run("qemu-io", "-f", "raw", "-c", "read 0 4k", uri).returncode == 0
    finally:
        stop(p)
    text = default.read_text()
    assert "READ offset" not in text  # requests only at -vv
    assert "connected to export" in text and "disconnected from export" in text


def test_proxy_socket_activation_and_notify(tmp_path: Path) -> None:
    upstream = subprocess.Popen([PY, "-m", "pynbd", "serve", "--port", "0", "memory:8M"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env())
    sock = str(tmp_path / "proxy.sock")
    notify = str(tmp_path / "notify")
    n = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    n.bind(notify)
    n.settimeout(30)
    e = env()
    e["NOTIFY_SOCKET"] = notify
    proxy = None
    try:
        assert upstream.stdout is not None
        up_uri = upstream.stdout.readline().decode().strip()
        proxy = subprocess.Popen(["systemd-socket-activate", "-l", sock, "-E", "PYTHONPATH",
                                  "-E", "NOTIFY_SOCKET", PY, "-m", "pynbd", "proxy",
                                  "--upstream", up_uri], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, env=e)
        wait_for(lambda: os.path.exists(sock), "the activation socket")
        r = run("qemu-io", "-f", "raw", "-c", "write -P 0x33 0 64k", "-c", "read -P 0x33 0 64k",
                f"nbd+unix:///?socket={sock}")
        assert r.returncode == 0 and "read 65536/65536" in r.stdout, r.stdout + r.stderr
        assert "READY=1" in n.recv(4096).decode()
        r = run("nbdinfo", "--size", f"nbd+unix:///?socket={sock}")
        assert r.stdout.strip() == str(8 * MiB)
        # the data went through to the upstream
        r = run("qemu-io", "-f", "raw", "-c", "read -P 0x33 0 64k", up_uri)
        assert r.returncode == 0, r.stderr
    finally:
        if proxy is not None:
            assert stop(proxy) == 0
        stop(upstream)
        n.close()


def test_listen_socket_activation(tmp_path: Path) -> None:
    """pynbd listen takes its msgr2 socket from systemd; a mirror migrates into it."""
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(2 * MiB) + bytes(6 * MiB))
    dst = tmp_path / "dst.img"
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32).hex().encode())
    key.chmod(0o600)
    port = free_port()
    ctl = str(tmp_path / "ctl")
    listen = subprocess.Popen(["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "-E",
                               "PYTHONPATH", PY, "-m", "pynbd", "listen", str(dst), "--size",
                               "8M", "--psk-file", str(key), "--exit-after-commit"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env())
    serve = subprocess.Popen([PY, "-m", "pynbd", "serve", "--socket",
                              str(tmp_path / "s.sock"), "--control", ctl, str(src)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env())
    try:
        assert serve.stdout is not None
        serve.stdout.readline()
        wait_for(lambda: os.path.exists(ctl), "the control socket")
        r = run(PY, "-m", "pynbd", "mirror", "--control", ctl, "--to",
                f"msgr2://127.0.0.1:{port}", "--psk-file", str(key), "--wait", timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert listen.wait(60) == 0
        assert dst.read_bytes() == src.read_bytes()
        assert listen.stderr is not None
        assert b"socket-activated msgr2 listener" in listen.stderr.read()
    finally:
        stop(listen)
        stop(serve)
