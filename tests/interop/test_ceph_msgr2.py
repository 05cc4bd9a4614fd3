"""pynbd's msgr2 against real Ceph 16.2 daemons (tests/conftest.py starts them on loopback):
monitor sessions in auth none + crc, cephx + crc and cephx + secure (each to SERVER_IDENT,
then a keepalive round trip and ``status``), and a cephx + secure session to the OSD."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
from tests.support.ceph_cluster import CephCluster
from tests.support.processes import run_pynbd

from pynbd.ceph.keyring import read_keyring
from pynbd.ceph.monclient import MonClient, target_from_conf
from pynbd.msgr2.aio import Msgr2Client, SessionOptions
from pynbd.msgr2.auth import AuthNone, CephxAuth, CryptoKey
from pynbd.msgr2.constants import EntityType
from pynbd.msgr2.encoding import EntityName
from pynbd.msgr2.errors import AuthenticationError

pytestmark = [pytest.mark.interop, pytest.mark.ceph, pytest.mark.timeout(300)]

OPTS = SessionOptions(connect_timeout=20.0, keepalive_timeout=60.0)


def cephx_auth(cluster: CephCluster) -> CephxAuth:
    assert cluster.keyring_path is not None
    return CephxAuth(EntityName.parse("client.admin"),
                     read_keyring(cluster.keyring_path, "client.admin"))


async def _mon_session(cluster: CephCluster, auth: AuthNone | CephxAuth, mode: str) -> None:
    host, port = cluster.mon_addr
    s = await Msgr2Client.connect(host, port, auth=auth, mode=mode, lossless=False,
                                  options=OPTS)
    try:
        est = s.established
        assert est is not None  # SERVER_IDENT received
        assert est.lossy
        assert est.peer_addrs.addrs[0].port == port
        assert s.session.server_cookie == 0 or s.session.server_cookie  # present
        rtt = await s.keepalive(timeout=20)
        assert rtt >= 0
    finally:
        await s.close()


def test_mon_auth_none_crc(ceph_none: CephCluster) -> None:
    asyncio.run(_mon_session(ceph_none, AuthNone(), "crc"))


def test_mon_cephx_crc(ceph_cephx: CephCluster) -> None:
    asyncio.run(_mon_session(ceph_cephx, cephx_auth(ceph_cephx), "crc"))


def test_mon_cephx_secure(ceph_cephx: CephCluster) -> None:
    asyncio.run(_mon_session(ceph_cephx, cephx_auth(ceph_cephx), "secure"))


def test_mon_cephx_wrong_key_is_refused(ceph_cephx: CephCluster) -> None:
    auth = CephxAuth(EntityName.parse("client.admin"), CryptoKey(os.urandom(16)))
    host, port = ceph_cephx.mon_addr
    with pytest.raises(AuthenticationError, match="permission denied"):
        asyncio.run(Msgr2Client.connect(host, port, auth=auth, mode="secure", lossless=False,
                                        options=OPTS))


def run_status(args: list[str]) -> tuple[int, str, str]:
    """``pynbd ceph status ARGS`` as a user runs it: a subprocess of the real CLI."""
    p = run_pynbd("ceph", "status", *args, text=True, timeout=120, python=sys.executable)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.parametrize("cluster,mode", [("ceph_none", "crc"), ("ceph_cephx", "crc"),
                                          ("ceph_cephx", "secure")])
def test_status(cluster: str, mode: str, request: pytest.FixtureRequest) -> None:
    c: CephCluster = request.getfixturevalue(cluster)
    rc, out, err = run_status(["-c", str(c.conf_path), "--mode", mode])
    assert rc == 0, err
    status = json.loads(out)
    assert status["fsid"] == c.fsid
    assert "health" in status and status["osdmap"]["num_osds"] == 1


def test_status_errors(ceph_none: CephCluster, tmp_path: Path) -> None:
    rc, _, err = run_status(["-c", str(tmp_path / "missing.conf")])
    assert rc == 2 and "missing.conf" in err
    conf = tmp_path / "nomon.conf"
    conf.write_text("[global]\nfsid = 00000000-0000-0000-0000-000000000000\n")
    rc, _, err = run_status(["-c", str(conf)])
    assert rc == 2 and "mon_host" in err
    # a monitor address nobody listens on: clear error naming the mon, bounded time
    from tests.support.net import free_port

    port = free_port()
    conf.write_text(f"[global]\nmon_host = [v2:127.0.0.1:{port}]\nauth_client_required = none\n")
    rc, _, err = run_status(["-c", str(conf), "--connect-timeout", "3"])
    assert rc == 1 and f"127.0.0.1:{port}" in err
    # secure mode needs cephx
    rc, _, err = run_status(["-c", str(ceph_none.conf_path), "--mode", "secure"])
    assert rc == 2 and "cephx" in err


def test_fsid_from_monmap_when_conf_has_none(ceph_cephx: CephCluster, tmp_path: Path) -> None:
    text = Path(ceph_cephx.conf_path).read_text()
    conf = tmp_path / "ceph.conf"
    conf.write_text("\n".join(ln for ln in text.splitlines() if not ln.startswith("fsid")))

    async def main() -> str:
        mon = await MonClient.connect(target_from_conf(conf, keyring=str(
            ceph_cephx.keyring_path)), "secure", 20)
        try:
            return str(await mon.fsid())
        finally:
            await mon.close()

    assert asyncio.run(main()) == ceph_cephx.fsid


def test_osd_cephx_secure(ceph_cephx: CephCluster) -> None:
    async def main() -> None:
        target = target_from_conf(ceph_cephx.conf_path)
        mon = await MonClient.connect(target, "secure", 20)
        try:
            host, port, nonce = await mon.osd_addr(0)
        finally:
            await mon.close()
        assert ceph_cephx.osd_addr is None or port == ceph_cephx.osd_addr[1]
        assert isinstance(target.auth, CephxAuth)
        assert EntityType.OSD in target.auth.tickets
        s = await Msgr2Client.connect(host, port, auth=target.auth, mode="secure",
                                      lossless=False, target_nonce=nonce, options=OPTS)
        try:
            assert s.established is not None
            assert s.established.peer_addrs.addrs[0].nonce == nonce
            assert await s.keepalive(timeout=20) >= 0
        finally:
            await s.close()

    asyncio.run(main())
