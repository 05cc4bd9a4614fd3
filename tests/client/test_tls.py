"""STARTTLS with x509 against nbdkit, qemu-nbd and pynbd serve, with generated certs."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from pynbd.client import Client, OptionError, PeerProtocolError, TLSConfig, aio, connect
from pynbd.protocol.constants import Rep
from tests.client.conftest import IMAGE_DATA, IMAGE_SIZE, TIMEOUT, Servers
from tests.support.certs import make_pki

pytestmark = pytest.mark.interop

TLS_SERVERS = ["nbdkit", "qemu-nbd"]


@pytest.mark.parametrize("transport", ["tcp", "tcp6", "unix"])
@pytest.mark.parametrize("kind", TLS_SERVERS)
def test_tls_every_phase(servers: Servers, pki: Path, kind: str, transport: str) -> None:
    srv = servers.start(kind, transport, tls_dir=pki)
    # nbd+unix has no host name: verify against the certificate's DNS name
    params = {"tls-hostname": "localhost"} if transport == "unix" else {}
    with connect(srv.uri(**params), timeout=TIMEOUT) as c:
        assert c.tls_active and c.structured
        assert c.read(IMAGE_DATA[0][0], 6) == b"pynbd!"
        c.write(0, b"secret" * 1000)
        assert c.read(0, 6000) == b"secret" * 1000
        assert c.block_status(0, IMAGE_SIZE)["base:allocation"]
        reqs = [c.submit_read(off, 65536) for off in range(0, 1 << 20, 65536)]
        c.wait_all()
        assert reqs[0].view is not None and reqs[0].view[:6] == b"secret"
    assert c.close_result is not None and c.close_result.flushed


def test_tls_hostname_verification(servers: Servers, pki: Path) -> None:
    srv = servers.start("nbdkit", tls_dir=pki)
    # the certificate names localhost/127.0.0.1/::1, not this name
    with pytest.raises(ssl.SSLCertVerificationError):
        connect(srv.uri(**{"tls-hostname": "wrong.example"}), timeout=TIMEOUT)
    # the name is in the certificate
    with connect(srv.uri(**{"tls-hostname": "localhost"}), timeout=TIMEOUT) as c:
        assert c.tls_active


def test_tls_untrusted_ca(servers: Servers, pki: Path, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other", ca_name="another CA")
    srv = servers.start("qemu-nbd", tls_dir=pki)
    with pytest.raises(ssl.SSLCertVerificationError):
        connect(srv.uri(**{"tls-certificates": str(other)}), timeout=TIMEOUT)
    # explicit files and tls-verify-peer=0
    cfg = TLSConfig(ca_file=str(pki / "ca-cert.pem"), hostname="127.0.0.1")
    with connect(srv.uri(tls=False).replace("nbd://", "nbds://"), tls=cfg,
                 timeout=TIMEOUT) as c:
        assert c.tls_active
    with connect(srv.uri(**{"tls-certificates": str(other), "tls-verify-peer": "0"}),
                 timeout=TIMEOUT) as c:
        assert c.tls_active


def test_plaintext_client_refused_by_tls_server(servers: Servers, pki: Path) -> None:
    srv = servers.start("nbdkit", tls_dir=pki)
    c = Client.dial(srv.uri(tls=False), timeout=TIMEOUT)
    c.handshake()
    with pytest.raises(OptionError) as ei:
        c.go()
    assert ei.value.reply == Rep.ERR_TLS_REQD
    c.close()


def test_nbds_to_server_without_tls_fails(servers: Servers) -> None:
    srv = servers.start("nbdkit")
    with pytest.raises(OptionError):
        connect(srv.uri(tls=True, **{"tls-certificates": "/nonexistent"}), timeout=TIMEOUT)


@pytest.mark.parametrize("kind", TLS_SERVERS)
def test_tls_asyncio(servers: Servers, pki: Path, kind: str) -> None:
    srv = servers.start(kind, tls_dir=pki)

    async def main() -> None:
        c = await aio.connect(srv.uri(), timeout=TIMEOUT)
        async with c:
            assert c.tls_active
            got = await asyncio.gather(*[c.read(IMAGE_DATA[0][0] + i * 6, 6) for i in range(50)])
            assert all(g == b"pynbd!" for g in got)
            await c.write(0, b"z" * 100000)
            assert await c.read(0, 100000) == b"z" * 100000
        assert c.close_result is not None and c.close_result.flushed
    asyncio.run(asyncio.wait_for(main(), 60))


def test_tls_pynbd_serve(servers: Servers, pki: Path) -> None:
    d = servers.tmp / "pynbd-tls"
    d.mkdir()
    from tests.support.nbd_servers import start_pynbd
    srv = start_pynbd(d, "memory:16M", extra=["--tls", "require", "--tls-certificates",
                                               str(pki)])
    servers.started.append(srv)
    srv.tls_dir = pki
    with connect(srv.uri(), timeout=TIMEOUT) as c:
        assert c.tls_active and c.can_safe_close()
        c.write(0, b"tls" * 1000)
        assert c.read(0, 3000) == b"tls" * 1000
    assert c.close_result is not None and c.close_result.safe


def test_tls_client_certificate_required(servers: Servers, pki: Path, tmp_path: Path) -> None:
    srv = servers.start("nbdkit", tls_dir=pki, extra=["--tls-verify-peer"])
    # the certificates directory holds client-cert.pem/client-key.pem: accepted
    with connect(srv.uri(), timeout=TIMEOUT) as c:
        assert c.tls_active
        assert c.read(IMAGE_DATA[0][0], 6) == b"pynbd!"
    # only the CA, no client certificate: the server refuses the handshake (with TLS 1.3
    # the client may only notice when the server drops the connection afterwards)
    with pytest.raises((ssl.SSLError, OSError, OptionError, PeerProtocolError)):
        c2 = connect(srv.uri(**{"tls-certificates": str(tmp_path / "none"),
                                "x-tls-ca-file": str(pki / "ca-cert.pem")}), timeout=TIMEOUT)
        c2.read(0, 1)
