"""A small epoll event loop: the server's I/O driver in every worker.

One thread runs :meth:`Loop.run`; file descriptors get a callback for their events,
timers run on a heap, and other threads (blocking backends, the control socket) hand
work to the loop with :meth:`Loop.call_soon_threadsafe`, which wakes it through an
eventfd. asyncio would do all of this too, at 1.5-2x the CPU per request on the
4 KiB path (docs/design.md has the numbers); this loop does only what the server needs.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger("pynbd.server")

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR
EPOLLHUP = select.EPOLLHUP
EPOLLRDHUP = getattr(select, "EPOLLRDHUP", 0x2000)

FdCallback = Callable[[int], None]


class Timer:
    """A handle for :meth:`Loop.call_later`; ``cancel()`` stops it from running."""

    __slots__ = ("callback", "cancelled", "loop", "when")

    def __init__(self, loop: Loop, when: float, callback: Callable[[], None]) -> None:
        self.loop = loop
        self.when = when
        self.callback: Callable[[], None] | None = callback
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.callback = None  # drop what it holds now, not when it would have fired
            self.loop._timer_cancelled()


class Loop:
    def __init__(self) -> None:
        self._ep = select.epoll()
        self._handlers: dict[int, FdCallback] = {}
        self._masks: dict[int, int] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._cancelled = 0
        self._pending: deque[Callable[[], None]] = deque()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(self._wake_fd, EPOLLIN)
        self._stopped = False
        self.thread: threading.Thread | None = None
        #: threading.get_ident() of the thread running the loop (0 before it runs)
        self.thread_id = 0
        #: callbacks run once per iteration, after I/O (e.g. flushing batched replies)
        self._after_io: list[Callable[[], None]] = []

    # --- file descriptors ---------------------------------------------------------

    def add(self, fd: int, mask: int, callback: FdCallback) -> None:
        self._handlers[fd] = callback
        self._masks[fd] = mask
        self._ep.register(fd, mask)

    def modify(self, fd: int, mask: int) -> None:
        if self._masks.get(fd) != mask:
            self._masks[fd] = mask
            self._ep.modify(fd, mask)

    def remove(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None:
            self._masks.pop(fd, None)
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(fd)

    # --- timers and cross-thread calls ----------------------------------------------

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        t = Timer(self, time.monotonic() + max(0.0, delay), callback)
        heapq.heappush(self._timers, (t.when, next(self._seq), t))
        return t

    def _timer_cancelled(self) -> None:
        # a flood of short-lived connections cancels most of its timers: rebuild the heap
        # when they dominate it, so memory tracks the live timers
        self._cancelled += 1
        if self._cancelled > 1024 and self._cancelled * 2 > len(self._timers):
            self._timers = [e for e in self._timers if not e[2].cancelled]
            heapq.heapify(self._timers)
            self._cancelled = 0

    def call_soon(self, callback: Callable[[], None]) -> None:
        """From the loop thread: run ``callback`` after the current event."""
        self._pending.append(callback)

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        self._pending.append(callback)  # deque.append is atomic
        fd = self._wake_fd
        if fd >= 0:  # -1 once the loop ended: its descriptor number may be reused
            with contextlib.suppress(OSError):
                os.eventfd_write(fd, 1)

    def add_after_io(self, callback: Callable[[], None]) -> None:
        self._after_io.append(callback)

    def stop(self) -> None:
        self._stopped = True
        fd = self._wake_fd
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.eventfd_write(fd, 1)

    # --- running ----------------------------------------------------------------------

    def run(self) -> None:  # noqa: C901 - the event loop: one frame, its locals hoisted for speed
        self.thread = threading.current_thread()
        self.thread_id = threading.get_ident()
        poll = self._ep.poll
        handlers = self._handlers
        pending = self._pending
        timers = self._timers
        wake_fd = self._wake_fd
        monotonic = time.monotonic
        cb2: Callable[[], None] | None = None
        cb3: Callable[[], None] | None = None
        t: Timer | None = None
        while not self._stopped:
            timers = self._timers
            if pending:
                timeout = 0.0
            elif timers:
                timeout = max(0.0, timers[0][0] - monotonic())
            else:
                timeout = -1.0
            try:
                events = poll(timeout)
            except InterruptedError:
                continue
            for fd, ev in events:
                if fd == wake_fd:
                    with contextlib.suppress(OSError):
                        os.eventfd_read(wake_fd)
                    continue
                cb = handlers.get(fd)
                if cb is not None:
                    try:
                        cb(ev)
                    except Exception:
                        log.exception("event handler for fd %d failed", fd)
            while pending:
                cb2 = pending.popleft()
                try:
                    cb2()
                except Exception:
                    log.exception("callback failed")
            if timers:
                now = monotonic()
                timers = self._timers
                while timers and timers[0][0] <= now:
                    _, _, t = heapq.heappop(timers)
                    if t.cancelled:
                        self._cancelled = max(0, self._cancelled - 1)
                        continue
                    cb4 = t.callback
                    t.cancelled = True
                    if cb4 is not None:
                        try:
                            cb4()
                        except Exception:
                            log.exception("timer failed")
            for cb3 in self._after_io:
                cb3()
            # the last callbacks must not live on in these names while the loop sleeps:
            # a finished connection's closure would keep its backend (and its files) open
            cb = cb2 = cb3 = cb4 = t = None
        self._ep.close()
        # completions of a blocking/aio backend may still arrive from its threads (e.g.
        # while its close() waits for them): they must not write to this number once it
        # is closed and perhaps reused by another socket or file
        fd, self._wake_fd = self._wake_fd, -1
        with contextlib.suppress(OSError):
            os.close(fd)

    def in_loop_thread(self) -> bool:
        return self.thread is threading.current_thread()
