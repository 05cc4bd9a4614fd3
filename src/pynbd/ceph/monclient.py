"""A minimal Ceph monitor client over msgr2: connect (auth none or cephx, crc or secure),
learn the fsid, run monitor commands."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from pynbd.ceph.conf import (
    CephConf,
    default_keyring_paths,
    expand_meta,
    parse_mon_host,
    read_ceph_conf,
)
from pynbd.ceph.keyring import read_keyring
from pynbd.ceph.messages import (
    decode_mon_command_ack,
    decode_monmap_fsid,
    encode_mon_command,
    encode_mon_subscribe,
)
from pynbd.msgr2.aio import ClientSession, Msgr2Client, SessionOptions
from pynbd.msgr2.auth import AuthNone, CephxAuth, ClientAuth
from pynbd.msgr2.constants import EntityType, MsgType
from pynbd.msgr2.encoding import EntityName
from pynbd.msgr2.errors import Msgr2Error, ProtocolError, UsageError


@dataclass
class MonTarget:
    """Where and how to reach the monitors, as read from a Ceph config."""

    addrs: list[tuple[str, int]]
    auth: ClientAuth
    fsid: uuid.UUID | None
    name: EntityName
    keyring: Path | None


def target_from_conf(conf_path: str | os.PathLike[str], name: str = "client.admin",
                     keyring: str | None = None, cluster: str = "ceph") -> MonTarget:
    """Read mon_host, fsid, auth_client_required and the keyring like Ceph's tools do."""
    conf: CephConf = read_ceph_conf(conf_path)
    ent = EntityName.parse(name)
    mon_host = conf.get(name, "mon_host")
    if not mon_host:
        raise UsageError(f"{conf.path}: no mon_host option (in [{name}], "
                         f"[{name.split('.')[0]}] or [global])")
    try:
        addrs = parse_mon_host(mon_host)
    except UsageError as exc:
        raise UsageError(f"{conf.path}: mon_host: {exc}") from None
    if not addrs:
        raise UsageError(f"{conf.path}: mon_host {mon_host!r} has no msgr2 (v2) address")
    fsid = None
    fs = conf.get(name, "fsid")
    if fs:
        try:
            fsid = uuid.UUID(fs)
        except ValueError:
            raise UsageError(f"{conf.path}: fsid {fs!r} is not a UUID") from None
    required = (conf.get(name, "auth_client_required") or "cephx, none").replace(",", " ").split()
    auth: ClientAuth
    kr_path: Path | None = None
    if not required or required[0] == "none":
        auth = AuthNone(name=ent)
    elif required[0] == "cephx":
        if keyring:
            candidates = [keyring]
        else:
            opt = conf.get(name, "keyring")
            candidates = ([expand_meta(p.strip(), cluster, name) for p in opt.split(",")]
                          if opt else default_keyring_paths(cluster, name))
        found = [p for p in candidates if Path(p).is_file()]
        if not found:
            if keyring:
                raise UsageError(f"keyring {keyring} does not exist")
            if "none" in required:
                auth = AuthNone(name=ent)
                return MonTarget(addrs, auth, fsid, ent, None)
            raise UsageError(f"no keyring for {name}: tried {', '.join(candidates)} "
                             f"(set 'keyring' in {conf.path} or pass --keyring)")
        kr_path = Path(found[0])
        auth = CephxAuth(ent, read_keyring(kr_path, name))
    else:
        raise UsageError(f"{conf.path}: auth_client_required = {required[0]!r} is not supported "
                         "(only cephx and none)")
    return MonTarget(addrs, auth, fsid, ent, kr_path)


class MonClient:
    def __init__(self, session: ClientSession, addr: tuple[str, int], fsid: uuid.UUID | None,
                 auth: ClientAuth) -> None:
        self.session = session
        self.addr = addr
        self._fsid = fsid
        self.auth = auth
        self._tid = 0

    @classmethod
    async def connect(cls, target: MonTarget, mode: str = "crc",
                      timeout: float = 10.0) -> MonClient:
        errors = []
        opts = SessionOptions(connect_timeout=timeout, keepalive_timeout=max(timeout, 30.0))
        for host, port in target.addrs:
            try:
                s = await Msgr2Client.connect(host, port, auth=target.auth, mode=mode,
                                              lossless=False, options=opts)
                return cls(s, (host, port), target.fsid, target.auth)
            except (OSError, TimeoutError, Msgr2Error) as exc:
                errors.append(f"mon {host}:{port}: {exc or type(exc).__name__}")
        raise ConnectionError("; ".join(errors))

    async def fsid(self, timeout: float = 10.0) -> uuid.UUID:
        if self._fsid is None:
            await self.session.send(MsgType.MON_SUBSCRIBE, encode_mon_subscribe({"monmap": 0}),
                                    version=3)

            async def wait_map() -> uuid.UUID:
                while True:
                    m = await self.session.recv()
                    if m.type == MsgType.MON_MAP:
                        return decode_monmap_fsid(m.front)

            self._fsid = await asyncio.wait_for(wait_map(), timeout)
        return self._fsid

    async def command(self, cmd: dict[str, object],
                      timeout: float = 30.0) -> tuple[int, str, bytes]:
        """Run a monitor command; returns (r, rs, output)."""
        fsid = await self.fsid(timeout)
        self._tid += 1
        tid = self._tid
        await self.session.send(MsgType.MON_COMMAND, encode_mon_command(tid, fsid, cmd), tid=tid)

        async def wait_ack() -> tuple[int, str, bytes]:
            while True:
                m = await self.session.recv()
                if m.type == MsgType.MON_COMMAND_ACK:
                    ack = decode_mon_command_ack(m.front)
                    if m.tid == tid:
                        return ack.r, ack.rs, bytes(m.data)

        return await asyncio.wait_for(wait_ack(), timeout)

    async def command_json(self, cmd: dict[str, object], timeout: float = 30.0) -> object:
        r, rs, out = await self.command({**cmd, "format": "json"}, timeout)
        if r < 0:
            raise ProtocolError(f"monitor command {cmd.get('prefix')!r} failed: {r} {rs}")
        return json.loads(out)

    async def osd_addr(self, osd_id: int) -> tuple[str, int, int]:
        """(host, port, nonce) of an OSD's public msgr2 address, from ``osd dump``."""
        dump = await self.command_json({"prefix": "osd dump"})
        assert isinstance(dump, dict)
        for osd in dump.get("osds", []):
            if osd.get("osd") == osd_id:
                for a in osd.get("public_addrs", {}).get("addrvec", []):
                    if a.get("type") == "v2":
                        host, _, port = a["addr"].rpartition(":")
                        return host, int(port), int(a["nonce"])
        raise ProtocolError(f"osd.{osd_id} has no msgr2 address in the osd map")

    async def close(self) -> None:
        await self.session.close(timeout=1.0)


__all__ = ["EntityType", "MonClient", "MonTarget", "target_from_conf"]
