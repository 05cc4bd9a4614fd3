"""A Ceph cluster's status (``ceph status --format json``), asked of a monitor over
pynbd's own msgr2."""

from __future__ import annotations

from pynbd.ceph.monclient import MonClient, MonTarget
from pynbd.msgr2.errors import UsageError


class CommandRefused(RuntimeError):
    """The monitor answered the command with an error."""


async def cluster_status(target: MonTarget, mode: str = "crc",
                         connect_timeout: float = 10.0) -> bytes:
    """The JSON the monitor returns for ``status``. Raises UsageError for a setup that
    cannot work, CommandRefused when the monitor says no, and OSError, TimeoutError or
    Msgr2Error when no monitor can be reached."""
    if mode == "secure" and target.keyring is None:
        raise UsageError("secure mode needs cephx (the cluster config says auth none)")
    mon = await MonClient.connect(target, mode, connect_timeout)
    try:
        r, rs, out = await mon.command({"prefix": "status", "format": "json"},
                                       timeout=max(connect_timeout, 30.0))
    finally:
        await mon.close()
    if r < 0:
        raise CommandRefused(f"mon {mon.addr[0]}:{mon.addr[1]} refused 'status': {r} {rs}")
    return out
