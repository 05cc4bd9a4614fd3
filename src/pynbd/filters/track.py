"""Write tracking: every range a WRITE, TRIM or WRITE_ZEROES touched is marked in a
tracker (live migration's dirty map, a backup bitmap), after the call, whether it
succeeded or not: a failed write may be partly applied, and the mirror must copy it
again. Put on the stack by the server while a tracker is attached."""

from __future__ import annotations

from typing import Protocol

from pynbd.backends.base import Backend
from pynbd.filters.base import Filter


class Tracker(Protocol):
    def mark(self, offset: int, length: int) -> None: ...


class TrackFilter(Filter):
    #: reads pass through unchanged: zero-copy stays possible
    sendfile_fd = property(lambda self: getattr(self.next, "sendfile_fd", None))

    def __init__(self, next: Backend, tracker: Tracker) -> None:
        super().__init__(next)
        self.tracker = tracker

    def pwrite(self, buf: memoryview | bytes, offset: int, fua: bool = False) -> None:
        try:
            self.next.pwrite(buf, offset, fua)
        finally:
            self.tracker.mark(offset, len(buf))

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        try:
            self.next.trim(offset, length, fua)
        finally:
            self.tracker.mark(offset, length)

    def zero(self, offset: int, length: int, may_trim: bool = True, fast: bool = False,
             fua: bool = False) -> None:
        try:
            self.next.zero(offset, length, may_trim, fast, fua)
        finally:
            self.tracker.mark(offset, length)
