"""TLS (NBD_OPT_STARTTLS, x509) against real clients: libnbd and qemu."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
from pathlib import Path

import nbd
import pytest

from tests.security.conftest import Served
from tests.support.processes import run_pynbd

IHAVEOPT = 0x49484156454F5054
REP_MAGIC = 0x3E889045565A9
# every strictness check libnbd 1.14 has
STRICT = (nbd.STRICT_COMMANDS | nbd.STRICT_FLAGS | nbd.STRICT_BOUNDS | nbd.STRICT_ZERO_SIZE
          | nbd.STRICT_ALIGN)


def client_dir(pki: Path, tmp_path: Path, with_client_cert: bool = True) -> Path:
    """What a client needs: the CA, and optionally its own certificate and key."""
    d = tmp_path / ("client-full" if with_client_cert else "client-ca-only")
    d.mkdir(exist_ok=True)
    shutil.copy(pki / "ca-cert.pem", d / "ca-cert.pem")
    if with_client_cert:
        shutil.copy(pki / "client-cert.pem", d / "client-cert.pem")
        shutil.copy(pki / "client-key.pem", d / "client-key.pem")
    return d


def nbdinfo(uri: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nbdinfo", *args, uri], capture_output=True, text=True, timeout=60)


def tls_uri(s: Served, certs: Path) -> str:
    return f"nbds://127.0.0.1:{s.port}/?tls-certificates={certs}"


def test_nbdinfo_negotiates_tls_when_required(serve, pki: Path, tmp_path: Path) -> None:
    s: Served = serve("--bind", "127.0.0.1", "--port", "0", "--tls=require",
                      "--tls-certificates", str(pki), "memory:16M")
    assert s.uri.startswith("nbds://")
    r = nbdinfo(tls_uri(s, client_dir(pki, tmp_path)))
    assert r.returncode == 0, r.stderr
    assert "using TLS" in r.stdout or "with TLS" in r.stdout, r.stdout
    assert "export-size: 16777216" in r.stdout


def test_plaintext_refused_when_required(serve, pki: Path) -> None:
    s: Served = serve("--bind", "127.0.0.1", "--port", "0", "--tls=require",
                      "--tls-certificates", str(pki), "memory:16M")
    r = nbdinfo(f"nbd://127.0.0.1:{s.port}/")
    assert r.returncode != 0
    # libnbd 1.14 words NBD_REP_ERR_TLS_REQD as a refused NBD_OPT_GO; the raw-socket
    # test below checks the exact reply type
    assert "server replied with error to opt_go" in r.stderr, r.stderr
    assert "export-size" not in r.stdout


def test_tls_on_allows_plaintext_and_tls(serve, pki: Path, tmp_path: Path) -> None:
    s: Served = serve("--bind", "127.0.0.1", "--port", "0", "--tls=on",
                      "--tls-certificates", str(pki), "memory:16M")
    plain = nbdinfo(f"nbd://127.0.0.1:{s.port}/")
    assert plain.returncode == 0, plain.stderr
    assert "without TLS" in plain.stdout
    secure = nbdinfo(tls_uri(s, client_dir(pki, tmp_path)))
    assert secure.returncode == 0, secure.stderr
    assert "without TLS" not in secure.stdout


def test_wrong_ca_refused(serve, pki: Path, other_pki: Path, tmp_path: Path) -> None:
    s: Served = serve("--bind", "127.0.0.1", "--port", "0", "--tls=require",
                      "--tls-certificates", str(pki), "memory:16M")
    r = nbdinfo(tls_uri(s, client_dir(other_pki, tmp_path)))
    assert r.returncode != 0
    # the server is still fine for a client with the right CA
    ok = nbdinfo(tls_uri(s, client_dir(pki, tmp_path)), "--size")
    assert ok.returncode == 0 and ok.stdout.strip() == "16777216", ok.stderr


def test_client_certificate_verification(serve, pki: Path, other_pki: Path,
                                         tmp_path: Path) -> None:
    s: Served = serve("--bind", "127.0.0.1", "--port", "0", "--tls=require",
                      "--tls-certificates", str(pki), "--tls-verify-peer", "memory:16M")
    # no client certificate at all
    r = nbdinfo(tls_uri(s, client_dir(pki, tmp_path, with_client_cert=False)))
    assert r.returncode != 0
    # a client certificate from another CA
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(pki / "ca-cert.pem", mixed / "ca-cert.pem")
    shutil.copy(other_pki / "client-cert.pem", mixed / "client-cert.pem")
    shutil.copy(other_pki / "client-key.pem", mixed / "client-key.pem")
    r = nbdinfo(tls_uri(s, mixed))
    assert r.returncode != 0
    # the trusted client certificate works
    r = nbdinfo(tls_uri(s, client_dir(pki, tmp_path)), "--size")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "16777216"


def test_python_libnbd_tls_data_round_trip(serve, pki: Path, tmp_path: Path) -> None:
    s: Served = serve("--bind", "127.0.0.1", "--port", "0", "--tls=require",
                      "--tls-certificates", str(pki), "memory:16M")
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(client_dir(pki, tmp_path)))
    h.set_strict_mode(STRICT)
    h.connect_tcp("127.0.0.1", str(s.port))
    assert h.get_tls_negotiated()
    data = bytes(range(256)) * 4096
    h.pwrite(data, 4096)
    h.flush()
    assert h.pread(len(data), 4096) == data
    h.shutdown()


def test_qemu_img_and_qemu_io_over_tls(serve, pki: Path, tmp_path: Path) -> None:
    s: Served = serve("--bind", "127.0.0.1", "--port", "0", "--tls=require",
                      "--tls-certificates", str(pki), "memory:16M")
    cdir = client_dir(pki, tmp_path)
    obj = f"tls-creds-x509,id=tls0,dir={cdir},endpoint=client"
    img = f"driver=nbd,host=127.0.0.1,port={s.port},tls-creds=tls0"
    w = subprocess.run(["qemu-io", "--object", obj, "--image-opts", img,
                        "-c", "write -P 0xab 0 1M", "-c", "read -P 0xab 0 1M"],
                       capture_output=True, text=True, timeout=60)
    assert w.returncode == 0, w.stderr
    assert "read 1048576/1048576" in w.stdout
    info = subprocess.run(["qemu-img", "info", "--object", obj, "--image-opts", img],
                          capture_output=True, text=True, timeout=60)
    assert info.returncode == 0, info.stderr
    assert "16 MiB" in info.stdout


def _opt(sock: socket.socket, opt: int, data: bytes = b"") -> tuple[int, int, bytes]:
    sock.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
    hdr = _recv(sock, 20)
    magic, ropt, rtype, n = struct.unpack(">QIII", hdr)
    assert magic == REP_MAGIC and ropt == opt
    return ropt, rtype, _recv(sock, n)


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def test_require_mode_refuses_options_before_starttls(serve, pki: Path) -> None:
    import ssl

    s: Served = serve("--bind", "127.0.0.1", "--port", "0", "--tls=require",
                      "--tls-certificates", str(pki), "memory:16M")
    with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
        _recv(sock, 18)
        sock.sendall(struct.pack(">I", 3))
        _, rtype, _ = _opt(sock, 3)  # LIST
        assert rtype == 2**31 + 5  # ERR_TLS_REQD
        _, rtype, _ = _opt(sock, 8)  # STRUCTURED_REPLY
        assert rtype == 2**31 + 5
        _, rtype, _ = _opt(sock, 5)  # STARTTLS
        assert rtype == 1
        ctx = ssl.create_default_context(cafile=str(pki / "ca-cert.pem"))
        tls = ctx.wrap_socket(sock, server_hostname="localhost")
        # a second STARTTLS is invalid
        _, rtype, _ = _opt(tls, 5)
        assert rtype == 2**31 + 3  # ERR_INVALID
        _, rtype, _ = _opt(tls, 8)
        assert rtype == 1
        _opt(tls, 2)  # ABORT
        tls.close()


def test_export_name_before_starttls_drops_connection(serve, pki: Path) -> None:
    s: Served = serve("--bind", "127.0.0.1", "--port", "0", "--tls=require",
                      "--tls-certificates", str(pki), "memory:16M")
    with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
        _recv(sock, 18)
        sock.sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, 1, 0))
        assert sock.recv(100) == b""  # dropped without revealing anything
    r = nbdinfo(f"nbd://127.0.0.1:{s.port}/")
    assert r.returncode != 0  # and still requires TLS


def test_tls_config_errors_are_clear(tmp_path: Path) -> None:
    r = run_pynbd("serve", "--tls=require", "--tls-certificates", str(tmp_path / "nope"),
                  "memory:1M", text=True, timeout=30)
    assert r.returncode == 2
    assert "not a directory" in r.stderr
    r = run_pynbd("serve", "--tls=on", "memory:1M", text=True, timeout=30)
    assert r.returncode == 2
    assert "--tls-certificates" in r.stderr


@pytest.mark.parametrize("mode", ["off"])
def test_tls_off_answers_starttls_unsupported(serve, mode: str) -> None:
    s: Served = serve("--bind", "127.0.0.1", "--port", "0", f"--tls={mode}", "memory:1M")
    with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
        _recv(sock, 18)
        sock.sendall(struct.pack(">I", 3))
        _, rtype, _ = _opt(sock, 5)
        assert rtype == 2**31 + 1  # ERR_UNSUP
        _, rtype, _ = _opt(sock, 8)
        assert rtype == 1
