"""The monitor messages pynbd sends and decodes."""

from __future__ import annotations

import struct
import uuid

from pynbd.ceph.messages import decode_mon_command_ack, decode_monmap_fsid, encode_mon_command


def test_mon_messages() -> None:
    fsid = uuid.uuid4()
    front = encode_mon_command(1, fsid, {"prefix": "status"})
    assert front[18:34] == fsid.bytes
    ack = struct.pack("<QHQi", 0, 0xFFFF, 0, -2) + struct.pack("<I", 3) + b"bad"
    a = decode_mon_command_ack(ack)
    assert (a.r, a.rs) == (-2, "bad")
    monmap = bytes([9, 6]) + struct.pack("<I", 20) + fsid.bytes + bytes(4)
    assert decode_monmap_fsid(struct.pack("<I", len(monmap)) + monmap) == fsid
