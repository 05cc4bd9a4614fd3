"""``pynbd proxy`` authenticates its clients or refuses to start (issue 11): loopback or a
Unix socket by default, another address only with TLS and client certificates (or an
explicit --insecure), and the access list checked before any byte is sent. The clients
are real programs (nbdinfo, libnbd)."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from pathlib import Path

from tests.migration._procs import Procs, run_cli, sparse_file
from tests.support.certs import make_pki
from tests.support.net import read_until_eof
from tests.support.processes import Process

SIZE = 16 * 1024 * 1024


def _upstream(procs: Procs, tmp_path: Path) -> str:
    img = tmp_path / "up.img"
    sparse_file(img, SIZE)
    _p, uri, _ctl = procs.serve(img, name="up")
    return uri


def _proxy(procs: Procs, upstream: str, *args: str, name: str = "proxy") -> tuple[Process, str]:
    p = procs.pynbd(["proxy", "--upstream", upstream, *args], name)
    return p, p.first_line()


def _port(uri: str) -> int:
    m = re.search(r":(\d+)/", uri)
    assert m, uri
    return int(m.group(1))


def _nbdinfo(uri: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([shutil.which("nbdinfo") or "nbdinfo", uri], capture_output=True,
                          text=True, timeout=60, check=False)


def test_proxy_refuses_to_listen_unauthenticated(procs: Procs, tmp_path: Path) -> None:
    up = _upstream(procs, tmp_path)
    pki = make_pki(tmp_path / "pki")
    for args, text in (
            (["--bind", "0.0.0.0", "--port", "0"], "refusing to listen on 0.0.0.0"),
            (["--bind", "0.0.0.0", "--port", "0"], "--insecure"),
            (["--bind", "0.0.0.0", "--port", "0", "--tls", "require", "--tls-certificates",
              str(pki)], "--tls-verify-peer"),
            (["--bind", "0.0.0.0", "--port", "0", "--tls", "on", "--tls-certificates",
              str(pki), "--tls-verify-peer"], "refusing to listen on 0.0.0.0"),
            (["--port", "0", "--allow", "not-a-network"], "invalid access list entry")):
        r = run_cli(["proxy", "--upstream", up, *args], timeout=60)
        err = r.stderr.decode()
        assert r.returncode == 2 and text in err, (args, err)
        assert r.stdout == b""


def test_proxy_listens_on_loopback_by_default(procs: Procs, tmp_path: Path) -> None:
    up = _upstream(procs, tmp_path)
    _p, uri = _proxy(procs, up, "--port", "0")
    assert uri.startswith("nbd://127.0.0.1:"), uri
    r = _nbdinfo(uri)
    assert r.returncode == 0 and f"export-size: {SIZE}" in r.stdout, r.stderr


def test_proxy_access_list_before_any_byte(procs: Procs, tmp_path: Path) -> None:
    up = _upstream(procs, tmp_path)
    _p, uri = _proxy(procs, up, "--port", "0", "--allow", "127.0.0.2/32")
    port = _port(uri)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        assert read_until_eof(s) == b""  # not even NBDMAGIC
    r = _nbdinfo(uri)
    assert r.returncode != 0 and "export-size" not in r.stdout
    with socket.create_connection(("127.0.0.1", port), timeout=5,
                                  source_address=("127.0.0.2", 0)) as s:
        s.settimeout(5)
        assert s.recv(8) == b"NBDMAGIC"
    _p2, uri2 = _proxy(procs, up, "--port", "0", "--default-deny", name="deny")
    with socket.create_connection(("127.0.0.1", _port(uri2)), timeout=5) as s:
        assert read_until_eof(s) == b""


def test_proxy_on_every_address_with_client_certificates(procs: Procs,
                                                         tmp_path: Path) -> None:
    up = _upstream(procs, tmp_path)
    pki = make_pki(tmp_path / "pki")
    _p, uri = _proxy(procs, up, "--bind", "0.0.0.0", "--port", "0", "--tls", "require",
                     "--tls-verify-peer", "--tls-certificates", str(pki))
    port = _port(uri)
    full = tmp_path / "client"
    ca_only = tmp_path / "ca-only"
    for d, files in ((full, ("ca-cert.pem", "client-cert.pem", "client-key.pem")),
                     (ca_only, ("ca-cert.pem",))):
        d.mkdir()
        for f in files:
            shutil.copy(pki / f, d / f)
    r = _nbdinfo(f"nbds://127.0.0.1:{port}/?tls-certificates={full}")
    assert r.returncode == 0 and f"export-size: {SIZE}" in r.stdout, r.stderr
    r = _nbdinfo(f"nbds://127.0.0.1:{port}/?tls-certificates={ca_only}")
    assert r.returncode != 0 and "export-size" not in r.stdout
    r = _nbdinfo(f"nbd://127.0.0.1:{port}/")
    assert r.returncode != 0 and "export-size" not in r.stdout


def test_proxy_insecure_on_every_address_warns(procs: Procs, tmp_path: Path) -> None:
    up = _upstream(procs, tmp_path)
    p, uri = _proxy(procs, up, "--bind", "0.0.0.0", "--port", "0", "--insecure")
    p.wait_for(lambda: "UNAUTHENTICATED" in p.logs(), "the warning")
    r = _nbdinfo(f"nbd://127.0.0.1:{_port(uri)}/")
    assert r.returncode == 0 and f"export-size: {SIZE}" in r.stdout, r.stderr
