"""Plugins that misbehave on purpose, one class each (select with ``:CLASS``)."""

from __future__ import annotations

import errno
import os
import time

from pynbd.backends import Backend, BackendError, Extent, Param, parse_size


class InitRaises(Backend):
    params = {"size": Param("disk size", parse_size, 1 << 20)}

    def __init__(self, size: int) -> None:
        raise RuntimeError("the disk is on fire")


class TooNew(Backend):
    api_version = 99

    def __init__(self) -> None:
        self.size = 1 << 20


class NotAnInt(Backend):
    def __init__(self) -> None:
        self.size = "lots"  # type: ignore[assignment]


class NegativeSize(Backend):
    def __init__(self) -> None:
        self.size = -4096


class _Ram(Backend):
    """A small RAM disk the faulty plugins below build on."""

    can_trim = True
    can_extents = True
    can_multi_conn = True
    multi_process = False

    def __init__(self, size: int = 8 << 20) -> None:
        self.size = size
        self.data = bytearray(size)

    def pread_into(self, buf: memoryview, offset: int) -> None:
        buf[:] = memoryview(self.data)[offset:offset + len(buf)]

    def pwrite(self, buf: memoryview | bytes, offset: int, fua: bool = False) -> None:
        self.data[offset:offset + len(buf)] = buf

    def zero(self, offset: int, length: int, may_trim: bool = True, fast: bool = False,
             fua: bool = False) -> None:
        self.data[offset:offset + length] = bytes(length)


#: requests at this offset fail (elsewhere the disk works)
BAD = 1 << 20


class Raises(_Ram):
    """``method`` raises ``exc`` (ValueError, KeyError, ...; or an errno name, raised as
    BackendError) for requests at offset BAD, and for every flush."""

    params = {"method": Param("which method fails"),
              "exc": Param("exception class name or errno name", str, "ValueError"),
              "blocking": Param("call on threads", lambda t: t == "true", True)}

    def __init__(self, method: str, exc: str, blocking: bool) -> None:
        super().__init__()
        self.method = method
        self.exc = exc
        self.blocking = blocking

    def _maybe(self, method: str, offset: int) -> None:
        if method != self.method or offset != BAD:
            return
        if self.exc.startswith("E"):
            code = getattr(errno, self.exc)
            raise BackendError(code, f"{method} failed on purpose")
        raise {"ValueError": ValueError, "KeyError": KeyError, "TypeError": TypeError,
               "AssertionError": AssertionError, "ZeroDivisionError": ZeroDivisionError,
               "RecursionError": RecursionError, "SystemExit": SystemExit,
               "KeyboardInterrupt": KeyboardInterrupt}[self.exc](f"bug in {method}")

    def pread_into(self, buf: memoryview, offset: int) -> None:
        self._maybe("pread_into", offset)
        super().pread_into(buf, offset)

    def pwrite(self, buf: memoryview | bytes, offset: int, fua: bool = False) -> None:
        self._maybe("pwrite", offset)
        super().pwrite(buf, offset, fua)

    def flush(self) -> None:
        self._maybe("flush", BAD)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._maybe("trim", offset)

    def zero(self, offset: int, length: int, may_trim: bool = True, fast: bool = False,
             fua: bool = False) -> None:
        self._maybe("zero", offset)
        super().zero(offset, length, may_trim, fast, fua)

    def cache(self, offset: int, length: int) -> None:
        self._maybe("cache", offset)

    def extents(self, offset: int, length: int) -> list[Extent]:
        self._maybe("extents", offset)
        return [Extent(length, 0)]


class BadExtents(_Ram):
    """extents() returns something that is not a list of extents."""

    params = {"kind": Param("none, garbage, empty, zero, negative, tuples, float, flags"),
              "blocking": Param("call on threads", lambda t: t == "true", True)}

    def __init__(self, kind: str, blocking: bool) -> None:
        super().__init__()
        self.kind = kind
        self.blocking = blocking

    def extents(self, offset: int, length: int) -> list[Extent]:
        k = self.kind
        bad: object = {
            "none": None,
            "garbage": "oops",
            "empty": [],
            "zero": [Extent(0, 0)],
            "negative": [Extent(-4096, 1)],
            "tuples": [(4096, 0)],
            "float": [Extent(4096.5, 0)],  # type: ignore[arg-type]
            "flags": [Extent(4096, 1 << 40)],
            "generator": (Extent(length, 0) for _ in range(1)),
        }[k]
        return bad  # type: ignore[return-value]


class Sleepy(_Ram):
    """Blocking: a read at offset 0 waits (at most 60 s) until the file ``trigger``
    exists; it creates ``trigger.waiting`` when it starts waiting."""

    params = {"trigger": Param("file whose existence releases the waiting reads")}
    blocking = True

    def __init__(self, trigger: str) -> None:
        super().__init__()
        self.trigger = trigger

    def pread_into(self, buf: memoryview, offset: int) -> None:
        if offset == 0:
            with open(self.trigger + ".waiting", "a") as f:
                f.write("x")
            deadline = time.monotonic() + 60
            while not os.path.exists(self.trigger) and time.monotonic() < deadline:
                time.sleep(0.01)
        super().pread_into(buf, offset)


class OpenConnectionRaises(_Ram):
    def open_connection(self, export: str, read_only: bool) -> Backend:
        raise RuntimeError("no more connections today")


class CloseConnectionRaises(_Ram):
    def close_connection(self) -> None:
        raise RuntimeError("cannot close")


class SlowOpen(_Ram):
    """Blocking; the first connection's open_connection waits (at most 60 s) until the
    file ``trigger`` exists, creating ``trigger.waiting`` when it starts waiting."""

    params = {"trigger": Param("file whose existence lets the first open finish")}
    blocking = True

    def __init__(self, trigger: str) -> None:
        super().__init__()
        self.trigger = trigger
        self.opened = 0

    def open_connection(self, export: str, read_only: bool) -> Backend:
        self.opened += 1
        if self.opened == 1:
            with open(self.trigger + ".waiting", "a") as f:
                f.write("x")
            deadline = time.monotonic() + 60
            while not os.path.exists(self.trigger) and time.monotonic() < deadline:
                time.sleep(0.01)
        return self
