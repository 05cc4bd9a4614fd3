"""The worker loops: each worker drives one source and one destination handle, taking
pieces from the shared work queue, with up to ``requests`` reads and writes in flight.

Three ways to move the data (the engine picks one per copy):

- :meth:`Worker._run_forward`: no buffers -- the kernel moves each payload from the
  source socket (or file) to the destination socket (splice/sendfile);
- :meth:`Worker._run_split`: buffers, with a reader thread and a writer thread so that
  receiving and sending overlap;
- :meth:`Worker._run`: buffers, one thread doing both.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias

from pynbd.copy.endpoints import Handle, Token
from pynbd.copy.errors import STALL_LIMIT, CopyError
from pynbd.copy.hasher import OrderedHasher
from pynbd.copy.workqueue import WorkQueue

if TYPE_CHECKING:  # imported where needed: it costs start-up time
    import queue

#: a read in flight: offset, length, is_zero, token, buffer view (None for zeroes)
_Read: TypeAlias = tuple[int, int, bool, Token, memoryview | None]
#: a write in flight: token, its buffer (returned to the free list when done), length
_Write: TypeAlias = tuple[Token, memoryview | None, int]
#: what the reader hands the writer: offset, length, is_zero, data
_Item: TypeAlias = tuple[int, int, bool, memoryview | None]


class Progress:
    """Bytes done so far, added to by every worker."""

    def __init__(self) -> None:
        self.done = 0
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:
            self.done += n


class Worker:
    """One source handle and one destination handle. Set ``forward`` (no buffers) or
    ``split`` (reader + writer thread) before :meth:`run`."""

    def __init__(self, sh: Handle, dh: Handle, queue: WorkQueue, progress: Progress, *,
                 requests: int, request_size: int, allocated: bool, skip_zero: bool,
                 hasher: OrderedHasher | None = None) -> None:
        self.sh, self.dh = sh, dh
        self.queue = queue
        self.progress = progress
        self.hasher = hasher
        self.depth = requests
        self.request_size = request_size
        self.allocated = allocated
        #: zero ranges need no write (the destination already reads as zeroes)
        self.skip_zero = skip_zero
        self.error: BaseException | None = None
        self.split = False
        self.forward = False
        # buffers are allocated on first use (zero-filling 2 x requests MiB up front
        # cost more CPU than small copies take), at most 2 * requests of them
        self.free: list[memoryview] = []
        self.buffers_left = 2 * requests

    def _new_buffer(self) -> memoryview | None:
        if not self.buffers_left:
            return None
        self.buffers_left -= 1
        return memoryview(bytearray(self.request_size))

    def run(self) -> None:
        """Copy until the queue is empty; an error is kept in ``error``."""
        try:
            if self.forward:
                self._run_forward()
            elif self.split:
                self._run_split()
            else:
                self._run()
        except BaseException as exc:
            self.error = exc
            if self.hasher is not None:
                self.hasher.abort()

    def _zero(self, off: int, ln: int) -> Token:
        if self.skip_zero:
            return None
        return self.dh.submit_zero(off, ln, self.allocated)

    # --- buffered, one thread --------------------------------------------------------

    def _run(self) -> None:
        # up to `depth` reads and `depth` writes in flight, 2*depth buffers
        reads: collections.deque[_Read] = collections.deque()
        writes: collections.deque[_Write] = collections.deque()
        depth = self.depth
        hasher = self.hasher
        free = self.free
        sh, dh = self.sh, self.dh
        exhausted = False
        while True:
            # keep the read pipeline full; free buffers by reaping the oldest writes
            while not exhausted and len(reads) < depth:
                if not free:
                    b = self._new_buffer()
                    if b is not None:
                        free.append(b)
                        continue
                    if not writes:
                        break
                    self._reap(writes)
                    continue
                item = self.queue.next()
                if item is None:
                    exhausted = True
                    break
                off, ln, zero = item
                if zero:
                    reads.append((off, ln, True, None, None))
                else:
                    rview = free.pop()[:ln]
                    reads.append((off, ln, False, sh.submit_read(off, rview), rview))
            if not reads:
                break
            off, ln, zero, token, view = reads.popleft()
            if zero:
                if hasher is not None:
                    hasher.update(off, None, ln)
                writes.append((self._zero(off, ln), None, ln))
            else:
                assert view is not None
                sh.wait(token)
                if hasher is not None:
                    hasher.update(off, view, ln)
                writes.append((dh.submit_write(off, view), view, ln))
            while writes and (len(writes) > depth or writes[0][0] is None):
                self._reap(writes)
        while writes:
            self._reap(writes)

    def _reap(self, writes: collections.deque[_Write]) -> None:
        wt, wv, wl = writes.popleft()
        self.dh.wait(wt)
        if wv is not None:
            self.free.append(memoryview(wv.obj))
        self.progress.add(wl)

    # --- buffered, a reader and a writer thread --------------------------------------

    def _run_split(self) -> None:
        """A reader thread (this one) and a writer thread per connection pair, so that
        receiving from the source and sending to the destination overlap (both release
        the GIL in their system calls). Items reach the writer in offset order."""
        h = _Handoff(self.free, self.depth, self._new_buffer)

        def writer() -> None:
            try:
                self._write_items(h.items, h.free, h.failed)
            except BaseException as exc:
                h.error.append(exc)
                h.failed.set()

        wt = threading.Thread(target=writer, daemon=True, name="pynbd-copy-writer")
        wt.start()
        try:
            reads: collections.deque[_Read] = collections.deque()
            hasher = self.hasher
            sh = self.sh
            exhausted = False
            while True:
                if not exhausted:
                    exhausted = self._fill_reads(reads, h)
                if not reads:
                    break
                off, ln, zero, token, view = reads.popleft()
                if not zero:
                    sh.wait(token)
                if hasher is not None:
                    hasher.update(off, view, ln)
                h.put((off, ln, zero, view))
            h.put(None)
        except BaseException:
            h.failed.set()
            wt.join(STALL_LIMIT)
            if h.error:  # the writer failed first: "copy aborted" hides why
                raise h.error[0] from None
            raise
        wt.join(STALL_LIMIT)
        if h.error:
            raise h.error[0]
        if wt.is_alive():  # never report success while the writer may still write
            h.failed.set()
            raise CopyError(f"the destination made no progress for {STALL_LIMIT:g} s "
                            "(the writer is still waiting on it)")

    def _fill_reads(self, reads: collections.deque[_Read], h: _Handoff) -> bool:
        """Submit reads until ``depth`` are in flight; True once the queue is empty."""
        import queue
        while len(reads) < self.depth:
            try:
                buf = h.take(not reads)
            except queue.Empty:
                if h.failed.is_set():
                    raise CopyError("copy aborted") from None
                if reads:
                    return False
                continue
            item = self.queue.next()
            if item is None:
                h.free.put(buf)
                return True
            off, ln, zero = item
            if zero:
                h.free.put(buf)
                reads.append((off, ln, True, None, None))
            else:
                rview = buf[:ln]
                reads.append((off, ln, False, self.sh.submit_read(off, rview), rview))
        return False

    def _write_items(self, handoff: queue.Queue[_Item | None],
                     free: queue.SimpleQueue[memoryview], failed: threading.Event) -> None:
        """The writer thread of :meth:`_run_split`: until the reader's final ``None``."""
        import queue
        writes: collections.deque[_Write] = collections.deque()
        depth = self.depth
        dh = self.dh
        deadline = time.monotonic() + STALL_LIMIT
        while True:
            try:
                item = handoff.get(timeout=0.5)
            except queue.Empty:
                if failed.is_set():
                    return
                if time.monotonic() > deadline:
                    raise CopyError("source stalled") from None
                continue
            deadline = time.monotonic() + STALL_LIMIT
            if item is None:
                break
            off, ln, zero, view = item
            if zero:
                writes.append((self._zero(off, ln), None, ln))
            else:
                assert view is not None
                writes.append((dh.submit_write(off, view), view, ln))
            while writes and (len(writes) > depth or writes[0][0] is None):
                self._reap_to(writes, free)
        while writes:
            self._reap_to(writes, free)

    def _reap_to(self, writes: collections.deque[_Write],
                 free: queue.SimpleQueue[memoryview]) -> None:
        wt, wv, wl = writes.popleft()
        self.dh.wait(wt)
        if wv is not None:
            free.put(memoryview(wv.obj))
        self.progress.add(wl)

    # --- without buffers -------------------------------------------------------------

    def _run_forward(self) -> None:
        """NBD -> NBD (or file -> NBD) without buffers: each data chunk of a source read
        reply becomes a WRITE whose payload the kernel moves from the source socket to
        the destination socket (splice through a pipe; sendfile from a file source).
        Python sees only the request and reply headers. Up to ``requests`` reads and
        ``requests`` writes in flight; replies may complete in any order."""
        depth = self.depth
        sh, dh = self.sh, self.dh
        dh.prepare_forward()
        writes: collections.deque[tuple[Token, int]] = collections.deque()
        reads: collections.deque[Token] = collections.deque()
        sink = _Forward(dh, self._zero, writes)
        exhausted = False
        while True:
            while not exhausted and len(reads) < depth:
                item = self.queue.next()
                if item is None:
                    exhausted = True
                    break
                off, ln, zero = item
                if zero:
                    writes.append((self._zero(off, ln), ln))
                else:
                    token = sh.submit_forward(off, ln, sink)
                    if token is not None:
                        reads.append(token)
                while len(writes) > depth:
                    self._reap_forward(writes)
            if not reads:
                break
            sh.wait(reads.popleft())
            while writes and (len(writes) > depth or writes[0][0] is None):
                self._reap_forward(writes)
        while writes:
            self._reap_forward(writes)

    def _reap_forward(self, writes: collections.deque[tuple[Token, int]]) -> None:
        wt, wl = writes.popleft()
        self.dh.wait(wt)
        self.progress.add(wl)


class _Handoff:
    """Between the reader (the worker's thread) and the writer thread of
    :meth:`Worker._run_split`: free buffers, items in offset order, and failure."""

    def __init__(self, buffers: list[memoryview], depth: int,
                 new_buffer: Callable[[], memoryview | None]) -> None:
        import queue
        self.free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for b in buffers:
            self.free.put(b)
        self.items: queue.Queue[_Item | None] = queue.Queue(maxsize=2 * depth)
        self.failed = threading.Event()
        self.error: list[BaseException] = []
        self._new_buffer = new_buffer

    def take(self, block: bool) -> memoryview:
        import queue
        try:
            return self.free.get_nowait()
        except queue.Empty:
            b = self._new_buffer()
            if b is not None:
                return b
            if not block:
                raise
        return self.free.get(timeout=0.5)

    def put(self, item: _Item | None) -> None:
        import queue
        deadline = time.monotonic() + STALL_LIMIT
        while True:
            if self.failed.is_set():
                raise CopyError("copy aborted")
            try:
                self.items.put(item, timeout=0.5)
                return
            except queue.Full:
                if time.monotonic() > deadline:
                    raise CopyError("destination stalled") from None


class _Forward:
    """The sink of :meth:`Worker._run_forward`: data chunks go straight on to the
    destination as writes, holes become zero writes."""

    def __init__(self, dh: Handle, zero: Callable[[int, int], Token],
                 writes: collections.deque[tuple[Token, int]]) -> None:
        self.dh = dh
        self.zero = zero
        self.writes = writes

    def data(self, offset: int, length: int, head: memoryview, fd: int,
             fd_offset: int | None = None) -> None:
        self.writes.append((self.dh.submit_write_from(offset, length, fd, head, fd_offset),
                            length))

    def hole(self, offset: int, length: int) -> None:
        self.writes.append((self.zero(offset, length), length))
