"""ceph.conf, monitor addresses and keyrings, read the way Ceph's own tools read them."""

from __future__ import annotations

import base64
import struct
import uuid
from pathlib import Path

import pytest

from pynbd.ceph.conf import parse_mon_host, read_ceph_conf
from pynbd.ceph.keyring import read_keyring
from pynbd.ceph.monclient import target_from_conf
from pynbd.msgr2.errors import UsageError


def test_keyring(tmp_path: Path) -> None:
    secret = bytes(range(16))
    blob = struct.pack("<HIIH", 1, 1700000000, 0, 16) + secret
    kr = tmp_path / "k"
    kr.write_text(f"[client.other]\n\tkey = {base64.b64encode(bytes(32)).decode()}\n"
                  f"[client.admin]\n\tkey = {base64.b64encode(blob).decode()}\n"
                  '\tcaps mon = "allow *"\n')
    assert read_keyring(kr, "client.admin").secret == secret
    with pytest.raises(UsageError, match=r"no key for client\.x"):
        read_keyring(kr, "client.x")
    with pytest.raises(UsageError, match=r"k:2"):
        read_keyring(kr, "client.other")
    with pytest.raises(UsageError, match="cannot read keyring"):
        read_keyring(tmp_path / "missing", "client.admin")


@pytest.mark.parametrize("value,want", [
    ("[v2:127.0.0.1:3300,v1:127.0.0.1:6789]", [("127.0.0.1", 3300)]),
    ("[v2:10.0.0.1:3300/0,v1:10.0.0.1:6789/0] [v2:10.0.0.2:3301]",
     [("10.0.0.1", 3300), ("10.0.0.2", 3301)]),
    ("10.0.0.1,10.0.0.2:4000", [("10.0.0.1", 3300), ("10.0.0.2", 4000)]),
    ("v2:127.0.0.1:5000", [("127.0.0.1", 5000)]),
    ("[v1:127.0.0.1:6789]", []),
])
def test_parse_mon_host(value: str, want: list[tuple[str, int]]) -> None:
    assert parse_mon_host(value) == want


def test_conf_and_target(tmp_path: Path) -> None:
    secret = bytes(16)
    blob = struct.pack("<HIIH", 1, 0, 0, 16) + secret
    kr = tmp_path / "ceph.client.admin.keyring"
    kr.write_text(f"[client.admin]\nkey = {base64.b64encode(blob).decode()}\n")
    conf = tmp_path / "ceph.conf"
    fsid = uuid.uuid4()
    conf.write_text(f"[global]\nfsid = {fsid}\nmon host = [v2:127.0.0.1:3300]  # comment\n"
                    "auth client required = cephx\n[client]\n"
                    f"keyring = {tmp_path}/$cluster.$name.keyring\n")
    c = read_ceph_conf(conf)
    assert c.get("client.admin", "mon_host") == "[v2:127.0.0.1:3300]"
    t = target_from_conf(conf)
    assert t.fsid == fsid and t.keyring == kr and t.addrs == [("127.0.0.1", 3300)]
    conf.write_text("[global]\nmon_host = 127.0.0.1\nauth_client_required = cephx\n")
    with pytest.raises(UsageError, match=r"no keyring for client\.admin"):
        target_from_conf(conf, keyring=None, cluster="nosuchcluster-pynbd")
    with pytest.raises(UsageError, match="does not exist"):
        target_from_conf(conf, keyring=str(tmp_path / "nope"))
    conf.write_text("[global]\nfsid = 1\n")
    with pytest.raises(UsageError, match="no mon_host"):
        target_from_conf(conf)
