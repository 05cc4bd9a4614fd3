"""``blocksize``: split and align requests for a plugin that only accepts some sizes.
Specified in docs/filters.md.

Every call the plugin sees is aligned to ``minblock`` (offset and length) and at most
``maxdata`` (READ, WRITE) or ``maxlen`` (TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS) bytes
long. Clients may send anything: an unaligned read reads the blocks around it; an
unaligned write or zero reads the partial block, patches it and writes it back
(read-modify-write) while holding that block's lock, which every thread and worker
process of the export shares (:mod:`pynbd.filters.blocklock`), so two writes to
different parts of one block cannot undo each other. Unaligned parts of a TRIM are
skipped (TRIM is advisory). The export's size is rounded down to ``minblock``.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

from pynbd.backends.base import Backend, BackendError, ConfigError, Extent, Param
from pynbd.filters.base import Filter
from pynbd.filters.blocklock import BlockLocks

log = logging.getLogger("pynbd.filters.blocksize")

MAX_MINBLOCK = 64 * 1024 * 1024


def _size(text: str) -> int:
    from pynbd.backends import parse_size

    n = parse_size(text)
    if n <= 0:
        raise ValueError("must be at least 1")
    return n


class BlocksizeFilter(Filter):
    """Aligns and splits requests for the layer below."""

    params = {
        "minblock": Param("alignment of every offset and length the plugin gets, a power "
                          "of 2 up to 64M (default: the plugin's minimum block size)",
                          _size, None),
        "maxdata": Param("largest READ or WRITE per plugin call, a multiple of minblock "
                         "(default: the plugin's maximum block size, at most 64M)",
                         _size, None),
        "maxlen": Param("largest TRIM, WRITE_ZEROES, CACHE or block status per plugin "
                        "call, a multiple of minblock (default 4G - minblock)", _size, None),
    }

    def __init__(self, next: Backend, minblock: int | None = None, maxdata: int | None = None,
                 maxlen: int | None = None, *, lock_fd: int | None = None) -> None:
        super().__init__(next)
        lo, _pref, hi = next.block_size
        mb = minblock if minblock is not None else max(1, int(lo))
        if mb & (mb - 1) or mb > MAX_MINBLOCK:
            raise ConfigError(f"filter blocksize: minblock={mb}: must be a power of 2 up "
                              "to 64M")
        if maxdata is None:
            maxdata = max(mb, min(int(hi), 64 * 1024 * 1024) // mb * mb)
        if maxlen is None:
            maxlen = ((1 << 32) - mb) // mb * mb
        for key, v in (("maxdata", maxdata), ("maxlen", maxlen)):
            if v < mb or v % mb:
                raise ConfigError(f"filter blocksize: {key}={v}: must be a multiple of "
                                  f"minblock={mb}")
        self.minblock = mb
        self.maxdata = maxdata
        self.maxlen = maxlen
        below = int(next.size)
        self._size = below // mb * mb
        if self._size != below:
            log.warning("blocksize: the export is %d bytes, rounded down to a multiple of "
                        "minblock=%d (the plugin's size is %d)", self._size, mb, below)
        self.locks = BlockLocks(lock_fd)
        self._owner = lock_fd is None
        #: read-modify-write cycles done by this process (status; a dict, so that the
        #: per-connection copies of the filter count into the same one)
        self.counts = {"rmw": 0}

    # --- workers ------------------------------------------------------------------------

    def worker_state(self) -> dict[str, object] | None:
        return {"lock_fd": self.locks.fd, "fds": [self.locks.fd]}

    @classmethod
    def from_worker_state(cls, next: Backend, state: dict[str, Any],
                          **params: Any) -> Filter:
        return cls(next, **params, lock_fd=int(state["lock_fd"]))

    # --- capabilities -------------------------------------------------------------------

    @property
    def size(self) -> int:  # type: ignore[override]
        return self._size

    @property
    def block_size(self) -> tuple[int, int, int]:  # type: ignore[override]
        """Clients may send any alignment (min 1); aligned requests are cheapest. Any
        length too: requests are split here, so the server's ``--max-request-size``
        alone bounds what clients are told."""
        pref = max(self.minblock, 512)
        return 1, pref, 0xFFFFFFFF

    # --- reading ----------------------------------------------------------------------

    def _read(self, buf: memoryview, offset: int, nowait: bool) -> bool:
        nxt = self.next
        read = nxt.pread_nowait if nowait else nxt.pread_into
        mb = self.minblock
        n = len(buf)
        end = offset + n
        pos = offset
        if pos % mb:  # the head: part of a block
            bstart = pos - pos % mb
            blk = bytearray(mb)
            if read(memoryview(blk), bstart) is False:
                return False
            take = min(end, bstart + mb) - pos
            buf[:take] = memoryview(blk)[pos - bstart:pos - bstart + take]
            pos += take
        aligned_end = end - end % mb
        step = self.maxdata
        while pos < aligned_end:
            k = min(step, aligned_end - pos)
            if read(buf[pos - offset:pos - offset + k], pos) is False:
                return False
            pos += k
        if pos < end:  # the tail: the start of a block
            blk = bytearray(mb)
            if read(memoryview(blk), pos) is False:
                return False
            buf[pos - offset:] = memoryview(blk)[:end - pos]
        return True

    def pread_into(self, buf: memoryview, offset: int) -> None:
        n = len(buf)
        if not (offset | n) & (self.minblock - 1) and n <= self.maxdata:
            self.next.pread_into(buf, offset)  # aligned and small enough already
        else:
            self._read(buf, offset, False)

    def pread_nowait(self, buf: memoryview, offset: int) -> bool:
        n = len(buf)
        if not (offset | n) & (self.minblock - 1) and n <= self.maxdata:
            return self.next.pread_nowait(buf, offset)
        return self._read(buf, offset, True)

    def resident(self, offset: int, length: int) -> bool:
        mb = self.minblock
        start = offset - offset % mb
        end = -(-(offset + length) // mb) * mb
        return self.next.resident(start, end - start)

    def extents(self, offset: int, length: int) -> list[Extent]:
        mb = self.minblock
        start = offset - offset % mb
        end = min(-(-(offset + max(length, 1)) // mb) * mb, self._size, start + self.maxlen)
        got = self.next.extents(start, end - start)
        skip = offset - start
        out: list[Extent] = []
        for e in got:
            n = e.length
            if skip:
                cut = min(skip, n)
                skip -= cut
                n -= cut
            if n > 0:
                out.append(Extent(n, e.flags))
        if not out:
            raise BackendError(errno.EIO, "blocksize: the plugin returned no extents")
        return out

    def cache(self, offset: int, length: int) -> None:
        mb = self.minblock
        start = offset - offset % mb
        end = min(-(-(offset + length) // mb) * mb, self._size)
        while start < end:
            k = min(self.maxlen, end - start)
            self.next.cache(start, k)
            start += k

    # --- writing ----------------------------------------------------------------------

    def _rmw(self, data: memoryview | None, pos: int, end: int, fua: bool) -> None:
        """Bytes ``pos..end`` within one block become ``data`` (None: zeros)."""
        mb = self.minblock
        bstart = pos - pos % mb
        with self.locks.hold(bstart // mb):
            blk = bytearray(mb)
            mv = memoryview(blk)
            self.next.pread_into(mv, bstart)
            if data is None:
                mv[pos - bstart:end - bstart] = bytes(end - pos)
            else:
                mv[pos - bstart:end - bstart] = data
            self.next.pwrite(mv, bstart, fua)
            self.counts["rmw"] += 1

    def _parts(self, offset: int, length: int) -> tuple[tuple[int, int] | None, int, int,
                                                     tuple[int, int] | None]:
        """(unaligned head, aligned start, aligned end, unaligned tail)."""
        mb = self.minblock
        end = offset + length
        a = -(-offset // mb) * mb
        b = end - end % mb
        if a > b:  # within one block
            return (offset, end), 0, 0, None
        head = (offset, a) if offset < a else None
        tail = (b, end) if b < end else None
        return head, a, b, tail

    def pwrite(self, buf: memoryview | bytes, offset: int, fua: bool = False) -> None:
        n = len(buf)
        if n and not (offset | n) & (self.minblock - 1) and n <= self.maxdata:
            self.next.pwrite(buf, offset, fua)  # aligned and small enough already
            return
        mv = memoryview(buf)
        if n == 0:
            if fua:
                self.next.flush()
            return
        head, a, b, tail = self._parts(offset, n)
        if head is not None:
            self._rmw(mv[:head[1] - offset], head[0], head[1], fua)
        pos = a
        while pos < b:
            k = min(self.maxdata, b - pos)
            self.next.pwrite(mv[pos - offset:pos - offset + k], pos, fua)
            pos += k
        if tail is not None:
            self._rmw(mv[tail[0] - offset:], tail[0], tail[1], fua)

    def zero(self, offset: int, length: int, may_trim: bool = True, fast: bool = False,
             fua: bool = False) -> None:
        if length <= 0:
            if fua:
                self.next.flush()
            return
        head, a, b, tail = self._parts(offset, length)
        if fast and (head is not None or tail is not None):
            raise BackendError(errno.ENOTSUP, "blocksize: zeroing part of a block needs a "
                                              "read-modify-write: not fast")
        if head is not None:
            self._rmw(None, head[0], head[1], fua)
        pos = a
        while pos < b:
            k = min(self.maxlen, b - pos)
            self.next.zero(pos, k, may_trim, fast, fua)
            pos += k
        if tail is not None:
            self._rmw(None, tail[0], tail[1], fua)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        _head, a, b, _tail = self._parts(offset, length)
        pos = a
        while pos < b:
            k = min(self.maxlen, b - pos)
            self.next.trim(pos, k, fua)
            pos += k
        if fua and a >= b:
            self.next.flush()

    # --- status and lifetime ----------------------------------------------------------

    def stats(self) -> dict[str, Any] | None:
        return dict(self.counts)

    def close(self) -> None:
        try:
            self.locks.close(owner=True)
        finally:
            self.next.close()
