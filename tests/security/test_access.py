"""Access list, control socket, status, metrics."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbd

from tests.security.conftest import Served
from tests.support.processes import run_pynbd


def nbdinfo_size(uri: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=60)


def connect_from(src: str, port: int, family: int = socket.AF_INET) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(10)
    s.bind((src, 0))
    dst = "127.0.0.1" if family == socket.AF_INET else "::1"
    s.connect((dst, port))
    return s


def greeted(sock: socket.socket) -> bool:
    """True if the server sent its greeting, False if it closed at once."""
    try:
        data = sock.recv(18)
    except ConnectionResetError:
        return False
    return data.startswith(b"NBDMAGIC")


def pynbd(*args: str) -> subprocess.CompletedProcess[str]:
    return run_pynbd(*args, text=True, timeout=60, python=sys.executable)


def test_allow_list_ipv4(serve) -> None:
    s: Served = serve("--bind", "127.0.0.1", "--port", "0", "--allow", "127.0.0.2/32",
                      "memory:1M")
    ok = connect_from("127.0.0.2", s.port)
    assert greeted(ok)
    ok.close()
    denied = connect_from("127.0.0.3", s.port)
    assert not greeted(denied)  # closed before any byte
    denied.close()
    assert nbdinfo_size(s.uri).returncode != 0  # 127.0.0.1 is not on the list


def test_allow_list_ipv6(serve) -> None:
    s: Served = serve("--bind", "::1", "--port", "0", "--allow", "::1/128", "memory:1M")
    assert nbdinfo_size(f"nbd://[::1]:{s.port}/").returncode == 0
    s2: Served = serve("--bind", "::1", "--port", "0", "--allow", "fd00::/8", "memory:1M")
    sock = connect_from("::1", s2.port, socket.AF_INET6)
    assert not greeted(sock)
    sock.close()


def test_default_deny_with_empty_list(serve) -> None:
    s: Served = serve("--bind", "127.0.0.1", "--port", "0", "--default-deny", "memory:1M")
    assert nbdinfo_size(s.uri).returncode != 0


def test_control_socket_status_and_acl_change_disconnects(serve, tmp_path: Path) -> None:
    ctl = str(tmp_path / "ctl.sock")
    s: Served = serve("--bind", "127.0.0.1", "--port", "0", "--control", ctl,
                      "--export-name", "disk", "memory:8M")
    assert stat.S_IMODE(os.stat(ctl).st_mode) == 0o600
    # a connected client from 127.0.0.2
    h = nbd.NBD()
    sock = connect_from("127.0.0.2", s.port)
    assert greeted(sock)
    sock.sendall(struct.pack(">I", 3))
    # libnbd client from 127.0.0.1 doing I/O
    h.connect_tcp("127.0.0.1", str(s.port))
    h.pwrite(b"x" * 4096, 0)
    h.pread(8192, 0)
    r = pynbd("status", "--control", ctl)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["pid"] == s.proc.pid
    assert st["clients"] == 2
    e = st["exports"][0]
    assert e["name"] == "disk" and e["size_bytes"] == 8 * 1024 * 1024
    assert e["bytes_written"] == 4096 and e["bytes_read"] == 8192
    assert e["requests"] >= 2 and e["errors"] == 0
    assert st["uptime_seconds"] >= 0
    # replace the ACL: only 127.0.0.1 stays allowed; the 127.0.0.2 client is dropped
    r = pynbd("acl", "--control", ctl, "127.0.0.1/32")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["127.0.0.1/32"]
    assert "disconnected 1" in r.stderr
    sock.settimeout(10)
    assert sock.recv(100) == b""
    sock.close()
    assert h.pread(4096, 0) == b"x" * 4096  # the allowed client keeps working
    new = connect_from("127.0.0.2", s.port)
    assert not greeted(new)
    new.close()
    r = pynbd("acl", "--control", ctl)
    assert r.stdout.split() == ["127.0.0.1/32"]
    bad = pynbd("acl", "--control", ctl, "not-an-address")
    assert bad.returncode == 1 and "invalid access list entry" in bad.stderr
    h.shutdown()


def test_silent_control_client_does_not_block_others(serve, tmp_path: Path) -> None:
    ctl = str(tmp_path / "ctl.sock")
    serve("--bind", "127.0.0.1", "--port", "0", "--control", ctl, "memory:1M")
    silent = [socket.socket(socket.AF_UNIX) for _ in range(3)]
    for c in silent:
        c.connect(ctl)
        c.sendall(b'{"cmd": "sta')  # never finished
    r = pynbd("status", "--control", ctl)
    assert r.returncode == 0 and json.loads(r.stdout)["clients"] == 0
    for c in silent:
        c.close()


def test_control_protocol_errors(serve, tmp_path: Path) -> None:
    ctl = str(tmp_path / "ctl.sock")
    serve("--bind", "127.0.0.1", "--port", "0", "--control", ctl, "memory:1M")
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(10)
        c.connect(ctl)
        f = c.makefile("rwb")
        for line, err in [(b"garbage", "invalid JSON"), (b"[1]", "expected an object"),
                          (b'{"cmd": "frobnicate"}', "unknown command")]:
            f.write(line + b"\n")
            f.flush()
            reply = json.loads(f.readline())
            assert reply["ok"] is False and err in reply["error"]
        f.write(b'{"cmd": "status"}\n')
        f.flush()
        assert json.loads(f.readline())["ok"] is True
    missing = pynbd("status", "--control", str(tmp_path / "absent"))
    assert missing.returncode == 3 and "no control socket" in missing.stderr


def test_prometheus_metrics(serve) -> None:
    s: Served = serve("--bind", "127.0.0.1", "--port", "0", "--metrics", "127.0.0.1:0",
                      "--export-name", "m", "memory:4M")
    url = None
    for _ in range(50):
        m = re.search(r"metrics on (http://\S+)", s.log())
        if m:
            url = m.group(1)
            break
        time.sleep(0.1)
    assert url, s.log()
    h = nbd.NBD()
    h.connect_tcp("127.0.0.1", str(s.port))
    h.pwrite(b"a" * 65536, 0)
    h.shutdown()
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    assert 'pynbd_export_size_bytes{export="m"} 4.194304e+06' in text
    assert 'pynbd_export_written_bytes_total{export="m"} 65536.0' in text
    assert "pynbd_connections_total" in text


def test_metrics_off_by_default(serve) -> None:
    s: Served = serve("--bind", "127.0.0.1", "--port", "0", "memory:1M")
    assert "metrics on" not in s.log()


def test_metrics_beyond_loopback_need_insecure(tmp_path: Path) -> None:
    """The metrics endpoint has no authentication: on an address other hosts can reach
    it is refused (exit 2, nothing served) unless --insecure says so."""
    p = pynbd("serve", "--socket", str(tmp_path / "s"), "--metrics", "0.0.0.0:0", "memory:1M")
    assert p.returncode == 2
    assert "refusing to serve metrics on 0.0.0.0" in p.stderr and "--insecure" in p.stderr


def test_unknown_server_keys_in_the_config_are_errors(tmp_path: Path) -> None:
    """A [server] key pynbd does not know (tls, allow: command-line options) must not be
    silently ignored: the operator would believe it in force."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('[server]\ntls = "require"\n\n[[export]]\nname = ""\ntarget = "memory:1M"\n')
    p = pynbd("serve", "--config", str(cfg), "--socket", str(tmp_path / "s"))
    assert p.returncode == 2
    assert "unknown keys ['tls']" in p.stderr
