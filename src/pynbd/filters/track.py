"""Write tracking: every range a WRITE, TRIM or WRITE_ZEROES touched is marked in a
tracker (live migration's dirty map, a backup bitmap), after the call, whether it
succeeded or not: a failed write may be partly applied, and the mirror must copy it
again. A tracker with ``mark_before`` is also marked before the call, so a process that
dies between changing the data and marking cannot lose the mark (backup bitmaps). Put on
the stack by the server while a tracker is attached."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pynbd.backends.base import Backend
from pynbd.filters.base import Filter


class Tracker(Protocol):
    def mark(self, offset: int, length: int) -> None: ...


class Trackers:
    """Several trackers as one."""

    def __init__(self, trackers: Sequence[Tracker]) -> None:
        self.trackers = tuple(trackers)
        self.mark_before = any(getattr(t, "mark_before", False) for t in self.trackers)
        self._before = tuple(t for t in self.trackers if getattr(t, "mark_before", False))

    def mark(self, offset: int, length: int) -> None:
        for t in self.trackers:
            t.mark(offset, length)

    def mark_early(self, offset: int, length: int) -> None:
        for t in self._before:
            t.mark(offset, length)


class TrackFilter(Filter):
    #: reads pass through unchanged: zero-copy stays possible
    sendfile_fd = property(lambda self: getattr(self.next, "sendfile_fd", None))

    def __init__(self, next: Backend, tracker: Tracker) -> None:
        super().__init__(next)
        self.tracker = tracker
        early = getattr(tracker, "mark_early", None)
        if early is None and getattr(tracker, "mark_before", False):
            early = tracker.mark
        self._early = early

    def pread_nowait(self, buf: memoryview, offset: int) -> bool:
        # reads pass through: the page-cache fast path (RWF_NOWAIT) stays too
        return self.next.pread_nowait(buf, offset)

    def pwrite(self, buf: memoryview | bytes, offset: int, fua: bool = False) -> None:
        if self._early is not None:
            self._early(offset, len(buf))
        try:
            self.next.pwrite(buf, offset, fua)
        finally:
            self.tracker.mark(offset, len(buf))

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        if self._early is not None:
            self._early(offset, length)
        try:
            self.next.trim(offset, length, fua)
        finally:
            self.tracker.mark(offset, length)

    def zero(self, offset: int, length: int, may_trim: bool = True, fast: bool = False,
             fua: bool = False) -> None:
        if self._early is not None:
            self._early(offset, length)
        try:
            self.next.zero(offset, length, may_trim, fast, fua)
        finally:
            self.tracker.mark(offset, length)
