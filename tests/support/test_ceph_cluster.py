"""Self-test of the Ceph cluster fixture: both clusters run at once and serve objects."""

from __future__ import annotations

import socket

import pytest
import rados

from tests.support.ceph_cluster import CephCluster

pytestmark = pytest.mark.ceph


def _put_get(cluster: CephCluster, name: str, data: bytes) -> bytes:
    conf = {"client_mount_timeout": "15", "rados_osd_op_timeout": "15"}
    if cluster.keyring_path is not None:
        conf["keyring"] = str(cluster.keyring_path)
    with rados.Rados(conffile=str(cluster.conf_path), name="client.admin", conf=conf) as r:
        with r.open_ioctx("rbd") as io:
            io.write_full(name, data)
            out: bytes = io.read(name, len(data) + 10)
            io.remove_object(name)
            return out


def test_cephx_cluster_put_get(ceph_cephx: CephCluster) -> None:
    assert ceph_cephx.running
    assert _put_get(ceph_cephx, "selftest", b"hello cephx") == b"hello cephx"
    assert ceph_cephx.mon_addr[0] == "127.0.0.1" and ceph_cephx.mon_addr[1] > 0
    assert ceph_cephx.osd_addr is not None and ceph_cephx.osd_addr[0] == "127.0.0.1"
    assert ceph_cephx.env["CEPH_CONF"] == str(ceph_cephx.conf_path)
    assert "auth_client_required = cephx" in ceph_cephx.conf_path.read_text()


def test_two_clusters_at_once(ceph_none: CephCluster, ceph_cephx: CephCluster) -> None:
    assert ceph_none.mon_addr != ceph_cephx.mon_addr
    assert ceph_none.fsid != ceph_cephx.fsid
    assert ceph_none.workdir != ceph_cephx.workdir
    assert _put_get(ceph_none, "selftest", b"hello none") == b"hello none"
    assert _put_get(ceph_cephx, "selftest", b"again") == b"again"
    # the mon really listens on loopback at the advertised port
    with socket.create_connection(ceph_none.mon_addr, timeout=5):
        pass


def test_cephx_rejects_a_client_without_key(ceph_cephx: CephCluster, tmp_path) -> None:
    conf = tmp_path / "ceph.conf"
    conf.write_text(f"[global]\nmon_host = {ceph_cephx.mon_host}\n"
                    "auth_client_required = cephx\nms_bind_msgr1 = false\n")
    empty = tmp_path / "empty.keyring"
    empty.write_text("")
    r = rados.Rados(conffile=str(conf), name="client.admin",
                    conf={"keyring": str(empty), "client_mount_timeout": "5"})
    with pytest.raises(rados.Error):
        r.connect(timeout=5)
    r.shutdown()
