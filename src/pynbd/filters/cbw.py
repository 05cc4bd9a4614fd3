"""Copy-before-write: what keeps a point-in-time view (``pynbd checkpoint``) frozen while
clients keep writing to the live export.

Not a user filter: the server puts :class:`CbwFilter` on the live export's stack (below
write tracking) while at least one view of it is open. Before a WRITE, TRIM or
WRITE_ZEROES changes a block (``BLOCK`` bytes) that a view has not saved yet, the filter
reads the block's old data from the layer below and saves it: into the view's sparse
scratch file at the block's own offset, or, when the old data is all zeros, just as a
"zero" mark. Only then does the change go down. Blocks already saved cost one byte
lookup per view.

The state of one view (:class:`ViewState`) is shared by every worker process:

- the *saved map*: a memfd mapped ``MAP_SHARED``, a header (``failed`` flag) and one
  byte per block: 0 not saved, 1 in the scratch file, 2 saved as zeros. A block goes
  from 0 to 1 or 2 once and never back.
- the scratch file, opened (``O_TMPFILE``: nothing is left behind by a crash) by the
  supervisor and reopened by each process through ``/proc/self/fd``, so each has its
  own open file description and its own OFD locks.
- a per-block lock across processes: an OFD lock (``F_OFD_SETLKW``) on the block's
  index in the scratch file, plus a thread lock inside a process (OFD locks do not
  exclude threads sharing one description). Two workers writing the same unsaved block
  cannot both copy it, and neither can write before the old data is saved.

A reader of the view (:meth:`ViewState.read`) takes no lock: it reads unsaved blocks
from the live image, then looks at the map again. A writer sets the map *before* it
changes the block, so a block still unsaved after the read was not changed before the
read finished; one that became saved meanwhile is read again from the scratch file.

A view whose scratch file fails (ENOSPC, EIO) is marked failed: from then on its readers
get EIO and writers stop saving for it. The live export never sees the error.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import struct
import tempfile
import threading
from typing import Any

from pynbd.backends.base import STATE_HOLE, STATE_ZERO, Backend, BackendError, Extent
from pynbd.filters.base import Filter
from pynbd.util.zeros import is_zero

log = logging.getLogger("pynbd.backup")

#: copy-before-write unit
BLOCK = 64 * 1024
#: blocks copied under one lock (at most 1 MiB at a time)
RUN = 16
HEADER = 64
NOT_SAVED, IN_SCRATCH, ZEROS = 0, 1, 2
_FAILED = 0
_ZERO_BLOCK = bytes(BLOCK)


def _flock(kind: int, start: int, length: int) -> bytes:
    # struct flock: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
    return struct.pack("@hhqqi4x", kind, os.SEEK_SET, start, length, 0)


class _Fd:
    """A descriptor closed when the last user lets go (a request still running on a
    thread may hold it after the view was released)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _reopen(fd: int) -> int:
    """A new open file description of the same file (its own OFD locks)."""
    return os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)


def create_scratch(directory: str, size: int) -> tuple[int, str]:
    """A sparse scratch file of ``size`` bytes in ``directory``: anonymous
    (``O_TMPFILE``) where the filesystem allows, else created and unlinked at once."""
    os.makedirs(directory, exist_ok=True)
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        where = f"{directory} (anonymous)"
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
        fd, path = tempfile.mkstemp(prefix=".pynbd-scratch-", dir=directory)
        os.unlink(path)
        where = f"{directory} (unlinked)"
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        raise
    return fd, where


class ViewState:
    """One view's copy-before-write state in one process (see the module docstring)."""

    def __init__(self, name: str, size: int, map_fd: int, scratch_fd: int,
                 block: int = BLOCK) -> None:
        """Takes ``map_fd``; opens its own description of ``scratch_fd`` (the caller
        keeps that one)."""
        self.name = name
        self.size = size
        self.block = block
        self.shift = block.bit_length() - 1
        self.nblocks = (size + block - 1) >> self.shift
        self.mm = mmap.mmap(map_fd, HEADER + max(self.nblocks, 1), flags=mmap.MAP_SHARED)
        os.close(map_fd)
        self._scratch = _Fd(_reopen(scratch_fd))
        self.fd = self._scratch.fd
        self.lock = threading.Lock()
        self._warned = False
        self.released = False

    @classmethod
    def create(cls, name: str, size: int, scratch_dir: str,
               block: int = BLOCK) -> tuple[ViewState, int, int, str]:
        """A new view: its state, the descriptors to share (map, scratch) and where the
        scratch lives."""
        nblocks = (size + block - 1) // block
        map_fd = os.memfd_create("pynbd-view", os.MFD_CLOEXEC)
        os.ftruncate(map_fd, HEADER + max(nblocks, 1))
        scratch_fd, where = create_scratch(scratch_dir, size)
        st = cls(name, size, os.dup(map_fd), scratch_fd, block)
        return st, map_fd, scratch_fd, where

    def share_meta(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "block": self.block}

    @classmethod
    def attach(cls, meta: dict[str, Any], map_fd: int, scratch_fd: int) -> ViewState:
        """A worker's state of a view (takes both descriptors)."""
        try:
            return cls(str(meta["name"]), int(meta["size"]), map_fd, scratch_fd,
                       int(meta["block"]))
        finally:
            os.close(scratch_fd)

    # --- status --------------------------------------------------------------------

    @property
    def failed(self) -> bool:
        return self.mm[_FAILED] != 0

    def fail(self, exc: OSError) -> None:
        self.mm[_FAILED] = errno.ENOSPC if exc.errno == errno.ENOSPC else errno.EIO
        if not self._warned:
            self._warned = True
            log.error("view %s failed: cannot save old data (%s); its readers get EIO, "
                      "the live export carries on; release it (pynbd checkpoint --release)",
                      self.name, exc.strerror or exc)

    @property
    def error(self) -> str:
        code = self.mm[_FAILED]
        if not code:
            return ""
        return ("its scratch space ran out (ENOSPC)" if code == errno.ENOSPC
                else "saving old data failed (EIO)")

    def counts(self) -> tuple[int, int]:
        """Blocks saved in the scratch file, and saved as zeros."""
        m = self.mm[HEADER:HEADER + self.nblocks]
        return m.count(IN_SCRATCH), m.count(ZEROS)

    def scratch_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        """Released: stop saving and serving. The descriptor and the map go when the
        last reference does (a request may still be running on a thread)."""
        self.released = True

    # --- the live export's side: save before change ---------------------------------------

    def preserve(self, below: Backend, offset: int, length: int) -> None:
        """Save every block of [offset, offset+length) not saved yet (from ``below``)."""
        if length <= 0 or self.released or self.mm[_FAILED]:
            return
        a = offset >> self.shift
        b = min((offset + length + self.block - 1) >> self.shift, self.nblocks)
        mm = self.mm
        while a < b:
            i = mm.find(b"\x00", HEADER + a, HEADER + b)
            if i < 0:
                return
            i -= HEADER
            j = mm.find(b"\x01", HEADER + i, HEADER + min(b, i + RUN))
            k = mm.find(b"\x02", HEADER + i, HEADER + min(b, i + RUN))
            ends = [x - HEADER for x in (j, k) if x >= 0]
            end = min([*ends, min(b, i + RUN)])
            if not self._save(below, i, end):
                return
            a = end

    def _save(self, below: Backend, first: int, end: int) -> bool:
        with self.lock:
            fcntl.fcntl(self.fd, fcntl.F_OFD_SETLKW, _flock(fcntl.F_WRLCK, first, end - first))
            try:
                return self._copy(below, first, end)
            finally:
                fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, first,
                                                                end - first))

    def _copy(self, below: Backend, first: int, end: int) -> bool:
        mm = self.mm
        if mm[_FAILED]:
            return False
        start = first << self.shift
        stop = min(end << self.shift, self.size)
        buf = bytearray(stop - start)
        view = memoryview(buf)
        try:
            below.pread_into(view, start)
        except OSError as exc:
            self.fail(exc)
            return False
        for blk in range(first, end):
            if mm[HEADER + blk]:  # another process saved it before we held the lock
                continue
            off = (blk - first) << self.shift
            piece = view[off:off + self.block]
            if is_zero(piece):
                mm[HEADER + blk] = ZEROS
                continue
            try:
                pos = start + off
                while piece:
                    n = os.pwrite(self.fd, piece, pos)
                    piece, pos = piece[n:], pos + n
            except OSError as exc:
                self.fail(exc)
                return False
            mm[HEADER + blk] = IN_SCRATCH
        return True

    # --- the view's side: the image as it was --------------------------------------------

    def _check(self) -> None:
        if self.released:
            raise BackendError(errno.ESHUTDOWN, f"view {self.name} has been released")
        if self.mm[_FAILED]:
            raise BackendError(errno.EIO, f"view {self.name} failed: {self.error}; "
                                          "release it (pynbd checkpoint --release)")

    def read(self, below: Backend, buf: memoryview, offset: int) -> None:
        self._check()
        end = offset + len(buf)
        pos = offset
        mm = self.mm
        while pos < end:
            blk = pos >> self.shift
            state = mm[HEADER + blk]
            # a run of blocks in the same state
            last = blk + 1
            limit = min(((end - 1) >> self.shift) + 1, self.nblocks)
            while last < limit and mm[HEADER + last] == state:
                last += 1
            stop = min(last << self.shift, end)
            part = buf[pos - offset:stop - offset]
            if state == NOT_SAVED:
                below.pread_into(part, pos)
                # saved meanwhile? then the live data may be newer: read it again
                for b in range(blk, last):
                    if mm[HEADER + b] != NOT_SAVED:
                        lo = max(b << self.shift, pos)
                        hi = min((b + 1) << self.shift, stop)
                        self._read_saved(mm[HEADER + b], buf[lo - offset:hi - offset], lo)
            else:
                self._read_saved(state, part, pos)
            pos = stop
        self._check()

    def _read_saved(self, state: int, part: memoryview, pos: int) -> None:
        if state == ZEROS:
            part[:] = _ZERO_BLOCK[:len(part)] if len(part) <= BLOCK else bytes(len(part))
            return
        done = 0
        while done < len(part):
            n = os.preadv(self.fd, [part[done:]], pos + done)
            if n <= 0:  # pragma: no cover - the scratch file is as large as the image
                part[done:] = bytes(len(part) - done)
                return
            done += n

    def extents(self, below: Backend, offset: int, length: int) -> list[Extent]:
        """``base:allocation`` of the view: saved blocks are data (or zero), the rest
        is what the live image says (checked again after asking it)."""
        self._check()
        end = min(offset + length, self.size)
        out: list[Extent] = []
        mm = self.mm
        pos = offset
        while pos < end and len(out) < 4096:
            blk = pos >> self.shift
            state = mm[HEADER + blk]
            if state != NOT_SAVED:
                stop = min((blk + 1) << self.shift, end)
                flags = STATE_HOLE | STATE_ZERO if state == ZEROS else 0
                out.append(Extent(stop - pos, flags))
                pos = stop
                continue
            last = blk + 1
            limit = min(((end - 1) >> self.shift) + 1, self.nblocks)
            while last < limit and mm[HEADER + last] == NOT_SAVED:
                last += 1
            stop = min(last << self.shift, end)
            got = below.extents(pos, stop - pos)
            # a block saved while we asked: its allocation may have changed since
            changed = next((b for b in range(blk, last) if mm[HEADER + b] != NOT_SAVED),
                           None)
            if changed is not None:
                stop = max(pos, changed << self.shift)
                if stop == pos:
                    continue
            p = pos
            for e in got:
                if p >= stop:
                    break
                n = min(e.length, stop - p)
                if n <= 0:
                    break
                out.append(Extent(n, e.flags))
                p += n
            if p == pos:  # pragma: no cover - a backend must return at least one byte
                out.append(Extent(stop - pos, 0))
                p = stop
            pos = p
        merged: list[Extent] = []
        for e in out:
            if merged and merged[-1].flags == e.flags:
                merged[-1] = Extent(merged[-1].length + e.length, e.flags)
            else:
                merged.append(e)
        self._check()
        return merged


class CbwFilter(Filter):
    """On the live export: save old data for every open view before a change."""

    #: reads pass through unchanged: zero-copy stays possible
    sendfile_fd = property(lambda self: getattr(self.next, "sendfile_fd", None))

    def __init__(self, next: Backend, views: tuple[ViewState, ...]) -> None:
        super().__init__(next)
        self.views = views

    def pread_nowait(self, buf: memoryview, offset: int) -> bool:
        # reads pass through: the page-cache fast path (RWF_NOWAIT) stays too
        return self.next.pread_nowait(buf, offset)

    def _preserve(self, offset: int, length: int) -> None:
        for v in self.views:
            v.preserve(self.next, offset, length)

    def pwrite(self, buf: memoryview | bytes, offset: int, fua: bool = False) -> None:
        self._preserve(offset, len(buf))
        self.next.pwrite(buf, offset, fua)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._preserve(offset, length)
        self.next.trim(offset, length, fua)

    def zero(self, offset: int, length: int, may_trim: bool = True, fast: bool = False,
             fua: bool = False) -> None:
        self._preserve(offset, length)
        self.next.zero(offset, length, may_trim, fast, fua)
