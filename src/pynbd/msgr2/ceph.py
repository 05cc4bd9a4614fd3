"""Encoders/decoders for the few Ceph messages pynbd sends to a monitor, and Ceph config
file reading (mon_host, keyring, auth) the way Ceph's own tools do it."""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from pynbd.msgr2._types import Buffer
from pynbd.msgr2.encoding import Reader, string, u8, u16, u32, u64
from pynbd.msgr2.errors import ProtocolError, UsageError


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


# ---------------------------------------------------------------------------- ceph.conf


@dataclass(frozen=True)
class CephConf:
    path: Path
    sections: dict[str, dict[str, str]]

    def get(self, name: str, key: str) -> str | None:
        """Option ``key`` for entity ``name`` (``client.admin``): [client.admin], then
        [client], then [global]; ``mon host`` and ``mon_host`` are the same option."""
        key = _norm(key)
        kind = name.split(".", 1)[0]
        for sect in (name, kind, "global"):
            v = self.sections.get(sect, {}).get(key)
            if v is not None:
                return v
        return None


def _norm(key: str) -> str:
    return re.sub(r"[\s_]+", "_", key.strip().lower())


def read_ceph_conf(path: str | os.PathLike[str]) -> CephConf:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read Ceph config {p}: {exc.strerror or exc}") from None
    sections: dict[str, dict[str, str]] = {}
    cur: dict[str, str] | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise UsageError(f"{p}:{lineno}: malformed section header {line!r}")
            cur = sections.setdefault(line[1:-1].strip(), {})
            continue
        k, sep, v = line.partition("=")
        if not sep:
            raise UsageError(f"{p}:{lineno}: expected 'key = value', got {line!r}")
        if cur is None:
            cur = sections.setdefault("global", {})
        v = re.split(r"\s[#;]", v, maxsplit=1)[0].strip().strip('"')
        cur[_norm(k)] = v
    return CephConf(p, sections)


def parse_mon_host(value: str, default_port: int = 3300) -> list[tuple[str, int]]:
    """msgr2 addresses from a mon_host value: ``[v2:IP:PORT,v1:IP:PORT] ...``, ``IP``,
    ``IP:PORT``, ``v2:IP:PORT``; v1-only entries are skipped."""
    out: list[tuple[str, int]] = []
    for group in re.findall(r"\[[^\]]*\]|[^\s,;\[\]]+", value):
        entries = group.strip("[]").split(",") if group.startswith("[") else [group]
        v2 = [e.strip() for e in entries if e.strip().startswith("v2:")]
        plain = [e.strip() for e in entries if not e.strip().startswith(("v1:", "v2:"))]
        for e in v2 or plain:
            addr = e[3:] if e.startswith("v2:") else e
            addr = addr.split("/", 1)[0]
            m = re.fullmatch(r"\[?([0-9a-fA-F:.]+?)\]?(?::(\d+))?", addr)
            if not m:
                raise UsageError(f"cannot parse monitor address {e!r} in mon_host")
            port = int(m.group(2)) if m.group(2) else default_port
            if not 0 < port < 65536:
                raise UsageError(f"bad port in monitor address {e!r}")
            out.append((m.group(1), port))
    return out


def default_keyring_paths(cluster: str, name: str) -> list[str]:
    return [f"/etc/ceph/{cluster}.{name}.keyring", f"/etc/ceph/{cluster}.keyring",
            "/etc/ceph/keyring", "/etc/ceph/keyring.bin"]


def expand_meta(value: str, cluster: str, name: str) -> str:
    kind, _, ident = name.partition(".")
    return (value.replace("$cluster", cluster).replace("$name", name).replace("$type", kind)
            .replace("$id", ident))


def check_mon_command_result(ack: MonCommandAck) -> None:
    if ack.r < 0:
        raise ProtocolError(f"monitor command failed: {ack.r} {ack.rs}")
