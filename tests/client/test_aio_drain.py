"""The asyncio client's write when the transport is full (the server stopped reading):
bounded by the client's timeout, and woken by a lost connection. Found by an audit: it
waited for the transport to drain with no bound and was never woken by the loss."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from pynbd.client import LocalProtocolError, PeerProtocolError, aio
from tests.support.pynbd_server import PynbdServer, free_unix_path

pytestmark = pytest.mark.interop


async def _times_out(uri: str, pid: int) -> str:
    c = await aio.connect(uri, timeout=2.0)
    await c.write(0, b"a" * 4096)
    os.kill(pid, signal.SIGSTOP)  # the server stops reading
    try:
        await c.write(0, b"b" * (16 << 20))
    except TimeoutError:
        return "timeout"
    finally:
        os.kill(pid, signal.SIGCONT)
        c.hard_close()
    return "written"


async def _sees_the_loss(uri: str, pid: int) -> str:
    c = await aio.connect(uri, timeout=None)  # no timeout: only the loss can end it
    os.kill(pid, signal.SIGSTOP)
    task = asyncio.create_task(c.write(0, b"c" * (16 << 20)))
    await asyncio.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    os.kill(pid, signal.SIGCONT)
    try:
        await asyncio.wait_for(task, 60)  # a hang guard
    except (OSError, PeerProtocolError, LocalProtocolError) as exc:
        return type(exc).__name__
    finally:
        c.hard_close()
    return "written"


def test_full_transport_write_times_out_then_sees_the_loss(tmp_path: Path) -> None:
    img = tmp_path / "img"
    img.write_bytes(bytes(64 << 20))
    srv = PynbdServer(["--workers", "1", "--socket", free_unix_path(tmp_path, "s.sock"),
                       str(img)], cwd=tmp_path)
    try:
        assert asyncio.run(_times_out(srv.uri, srv.pid)) == "timeout"
        got = asyncio.run(_sees_the_loss(srv.uri, srv.pid))
        assert got != "written", got
    finally:
        srv.stop()
