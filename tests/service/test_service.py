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
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.net import free_port
from tests.support.processes import Process, pynbd_argv, pynbd_env, pynbd_python, wait_until

PY = pynbd_python()
MiB = 1024 * 1024


def run(*cmd: str, timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                          env=pynbd_env(), **kw)  # type: ignore[call-overload]


def wait_for(pred: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    assert wait_until(pred, timeout, interval=0.05), f"timed out waiting for {what}"


def start(argv: list[str], env: dict[str, str] | None = None) -> Process:
    """``argv`` in the background, its output kept; stopped with SIGTERM (20 s), then
    SIGKILL."""
    return Process(argv, env=env, stop_timeout=20.0)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_socket_activation_tcp_and_unix(tmp_path: Path, workers: str) -> None:
    port = free_port()
    sock = str(tmp_path / "act.sock")
    p = start(["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "-l", sock,
               "--fdname=tcp:unix", "-E", "PYTHONPATH",
               *pynbd_argv("serve", "--workers", workers, "memory:16M")])
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
        text = p.output
        assert "socket-activated listener tcp" in text and "socket-activated listener unix" in text
    finally:
        assert p.stop() == 0
    assert os.path.exists(sock), "an inherited Unix socket is systemd's to remove"


def test_socket_activation_refuses_explicit_listen_flags(tmp_path: Path) -> None:
    port = free_port()
    p = start(["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "-E", "PYTHONPATH",
               *pynbd_argv("serve", "--port", "10999", "memory:1M")])
    try:
        def connected() -> bool:  # the first connection makes it exec pynbd serve
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            except OSError:
                return False
            return True

        wait_for(connected, "the activation socket")
        assert p.wait(20) == 2
        assert "socket-activated (LISTEN_FDS)" in p.output
    finally:
        p.stop()


def test_ready_and_stopping_notifications(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    n = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    n.bind(path)
    n.settimeout(30)
    p = start(pynbd_argv("serve", "--port", "0", "memory:1M"),
              env=pynbd_env({"NOTIFY_SOCKET": path}))
    try:
        msg = n.recv(4096).decode()
        assert "READY=1" in msg and f"MAINPID={p.pid}" in msg and "STATUS=serving" in msg
        p.kill(signal.SIGTERM)
        assert "STOPPING=1" in n.recv(4096).decode()
        assert p.wait(20) == 0
    finally:
        p.stop()
        n.close()


def test_run_passes_the_uri_and_the_exit_status(tmp_path: Path) -> None:
    out = tmp_path / "vars"
    r = run(*pynbd_argv(
        "serve", "--run",
        f'nbdinfo --size "$uri" > {out}; echo "$unixsocket|$port|$exportname|$tls" >> {out}; '
        "exit 7", "memory:16M"))
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
    r = run(*pynbd_argv("serve", "--run", f'qemu-img convert -O qcow2 "$uri" {dst}', str(src)),
            timeout=120)
    assert r.returncode == 0, r.stderr
    back = tmp_path / "back.raw"
    r = run("qemu-img", "convert", "-O", "raw", str(dst), str(back))
    assert r.returncode == 0, r.stderr
    assert back.read_bytes() == src.read_bytes()


def test_run_on_a_tcp_port_sets_port(tmp_path: Path) -> None:
    out = tmp_path / "port"
    r = run(*pynbd_argv("serve", "--bind", "127.0.0.1", "--port", "0", "--run",
                        f'echo "$port $uri" > {out}; nbdinfo --size "$uri" >> {out}',
                        "memory:1M"))
    assert r.returncode == 0, r.stderr
    first, size = out.read_text().splitlines()
    port, uri = first.split()
    assert int(port) > 0 and uri == f"nbd://127.0.0.1:{port}/" and size == str(MiB)


def test_exit_with_parent(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    parent = subprocess.Popen(
        ["/bin/sh", "-c", f"{PY} -m pynbd serve --port 0 --exit-with-parent "
                          f"--pidfile {pidfile} memory:1M > /dev/null 2>&1 & exec sleep 300"],
        env=pynbd_env())
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
    p = start(pynbd_argv("serve", "--port", "0", "--pidfile", str(pidfile), "memory:1M"))
    try:
        p.first_line()
        wait_for(pidfile.exists, "the pid file")
        assert pidfile.read_text().strip() == str(p.pid)
    finally:
        assert p.stop() == 0
    assert not pidfile.exists()


def test_exit_when_idle(tmp_path: Path) -> None:
    p = start(pynbd_argv("serve", "--port", "0", "--exit-when-idle", "2", "memory:1M"))
    try:
        uri = p.first_line().strip()
        r = run("nbdinfo", "--size", uri)
        assert r.returncode == 0
        assert p.wait(60) == 0
        assert "--exit-when-idle" in p.stderr
    finally:
        p.stop()


def test_logs_one_line_per_client_and_json(tmp_path: Path) -> None:
    p = start(pynbd_argv("serve", "--port", "0", "--log-format", "json", "--export-name", "disk",
                         "memory:1M"))
    try:
        uri = p.first_line().strip()
        r = run("qemu-io", "-f", "raw", "-c", "write 0 4k", uri)
        assert r.returncode == 0, r.stderr
    finally:
        p.stop()
    records = [json.loads(line) for line in p.stderr.splitlines()]
    events = [r for r in records if r.get("logger") == "pynbd.access"]
    assert [e["event"] for e in events] == ["connect", "disconnect"]
    assert all(e["export"] == "disk" and e["peer"].startswith("127.0.0.1:") for e in events)
    assert events[1]["bytes_written"] == 4096 and events[1]["reason"] == "NBD_CMD_DISC"
    assert all({"time", "level", "pid", "message"} <= set(r) for r in records)


def test_debug_logs_every_request(tmp_path: Path) -> None:
    p = start(pynbd_argv("serve", "-vv", "--port", "0", "--workers", "2", "memory:1M"))
    try:
        uri = p.first_line().strip()
        r = run("qemu-io", "-f", "raw", "-c", "write 8192 4k", "-c", "read 8192 4k", uri)
        assert r.returncode == 0, r.stderr
    finally:
        p.stop()
    text = p.stderr
    assert "WRITE offset 8192 length 4096" in text and "READ offset 8192 length 4096" in text
    p = start(pynbd_argv("serve", "--port", "0", "memory:1M"))
    try:
        uri = p.first_line().strip()
        assert run("qemu-io", "-f", "raw", "-c", "read 0 4k", uri).returncode == 0
    finally:
        p.stop()
    text = p.stderr
    assert "READ offset" not in text  # requests only at -vv
    assert "connected to export" in text and "disconnected from export" in text


def test_proxy_socket_activation_and_notify(tmp_path: Path) -> None:
    upstream = start(pynbd_argv("serve", "--port", "0", "memory:8M"))
    sock = str(tmp_path / "proxy.sock")
    notify = str(tmp_path / "notify")
    n = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    n.bind(notify)
    n.settimeout(30)
    proxy = None
    try:
        up_uri = upstream.first_line().strip()
        proxy = start(["systemd-socket-activate", "-l", sock, "-E", "PYTHONPATH", "-E",
                       "NOTIFY_SOCKET", *pynbd_argv("proxy", "--upstream", up_uri)],
                      env=pynbd_env({"NOTIFY_SOCKET": notify}))
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
        try:
            if proxy is not None:
                assert proxy.stop() == 0, proxy.output
        finally:  # the upstream goes even when the proxy's exit status is wrong
            upstream.stop()
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
    listen = start(["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "-E", "PYTHONPATH",
                    *pynbd_argv("listen", str(dst), "--size", "8M", "--psk-file", str(key),
                                "--exit-after-commit")])
    serve = start(pynbd_argv("serve", "--socket", str(tmp_path / "s.sock"), "--control", ctl,
                             str(src)))
    try:
        serve.first_line()
        wait_for(lambda: os.path.exists(ctl), "the control socket")
        r = run(*pynbd_argv("mirror", "--control", ctl, "--to", f"msgr2://127.0.0.1:{port}",
                            "--psk-file", str(key), "--wait"), timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert listen.wait(60) == 0
        assert dst.read_bytes() == src.read_bytes()
        assert "socket-activated msgr2 listener" in listen.stderr
    finally:
        listen.stop()
        serve.stop()
