"""The event loop's cross-thread wake-up after the loop has ended."""

from __future__ import annotations

import os
import threading

from pynbd.server.loop import Loop


def test_call_soon_threadsafe_after_the_loop_ended_writes_nowhere() -> None:
    """A blocking/aio backend can complete after the loop ended (its close() waits for
    requests of dropped clients): the wake-up must not go to a descriptor that reuses
    the closed eventfd's number."""
    loop = Loop()
    ran: list[str] = []
    t = threading.Thread(target=loop.run)
    t.start()
    loop.call_soon_threadsafe(lambda: ran.append("before"))
    loop.call_soon_threadsafe(loop.stop)
    t.join(10)
    assert not t.is_alive() and ran == ["before"]
    r, w = os.pipe()  # the lowest free numbers: the loop's closed ones come first
    try:
        os.set_blocking(r, False)
        loop.call_soon_threadsafe(lambda: ran.append("late"))  # from "librbd's thread"
        loop.stop()
        try:
            got = os.read(r, 64)
        except BlockingIOError:
            got = b""
        assert got == b""
        assert ran == ["before"]  # queued, never run: the loop is gone
    finally:
        os.close(r)
        os.close(w)
