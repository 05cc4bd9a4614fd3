"""Encoders and decoders for the few Ceph messages pynbd exchanges with a monitor
(MMonCommand and its ack, MMonSubscribe, the fsid in MMonMap)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from pynbd.msgr2._types import Buffer
from pynbd.msgr2.encoding import Reader, string, u8, u16, u32, u64


def encode_mon_command(tid: int, fsid: uuid.UUID, cmd: dict[str, object]) -> bytes:
    """Front of MMonCommand (type 50, version 1)."""
    text = json.dumps(cmd)
    # PaxosServiceMessage header: version, deprecated session mon, its tid (not ours: the
    # command's tid travels in the message header)
    return (u64(0) + u16(0xFFFF) + u64(0) + fsid.bytes + u32(1) + string(text))


@dataclass(frozen=True)
class MonCommandAck:
    session_mon_tid: int
    r: int
    rs: str


def decode_mon_command_ack(front: Buffer) -> MonCommandAck:
    rd = Reader(front, "MMonCommandAck")
    rd.u64()
    rd.u16()
    tid = rd.u64()
    r = rd.i32()
    rs = rd.string()
    return MonCommandAck(tid, r, rs)


def encode_mon_subscribe(what: dict[str, int], hostname: str = "") -> bytes:
    """Front of MMonSubscribe (type 15, version 3): name -> start epoch, flags 0."""
    body = u32(len(what))
    for name, start in what.items():
        body += string(name) + u64(start) + u8(0)
    return body + string(hostname)


def decode_monmap_fsid(front: Buffer) -> uuid.UUID:
    """The fsid from an MMonMap front (bufferlist holding an encoded MonMap)."""
    rd = Reader(Reader(front, "MMonMap").blob(), "MonMap")
    rd.u8()  # struct_v
    rd.u8()  # compat
    rd.u32()  # length
    return uuid.UUID(bytes=rd.raw(16))
