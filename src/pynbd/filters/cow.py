"""``cow``: copy-on-write. Writes, trims and zeroes go to an overlay; the layer below
(the base) is only ever read. Specified in docs/filters.md.

The overlay file and its block map (one state byte per block: in the base, in the
overlay, or zero), ephemeral or named and persisted, are :mod:`pynbd.filters.cow_overlay`.
This module is the filter over them: reads that follow the map, writes, zeroes and trims
that update it, block status, flush and close.

A write that covers part of a block whose bytes are not in the overlay yet copies the
block up first (read the base block, patch it, write the whole block to the overlay,
then mark it), under a per-block lock shared by every thread and worker process
(:mod:`pynbd.filters.blocklock`), so two writes to different parts of the same new
block cannot undo each other. Writes to blocks already in the overlay go straight to it.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

from pynbd.backends.base import (
    STATE_HOLE,
    STATE_ZERO,
    Backend,
    BackendError,
    ConfigError,
    Extent,
    Param,
)
from pynbd.filters.base import Filter
from pynbd.filters.cow_overlay import (
    BASE,
    DATA,
    DEFAULT_BLOCKSIZE,
    MAP_DATA_OFFSET,
    MAP_HEADER,
    MAP_MAGIC,
    MAP_VERSION,
    MAX_BLOCKSIZE,
    MIN_BLOCKSIZE,
    ZERO,
    ZERO_ALLOC,
    Overlay,
    ephemeral_overlay,
    named_overlay,
    overlay_from_state,
)

__all__ = [
    "BASE",
    "DATA",
    "DEFAULT_BLOCKSIZE",
    "MAP_DATA_OFFSET",
    "MAP_HEADER",
    "MAP_MAGIC",
    "MAP_VERSION",
    "MAX_BLOCKSIZE",
    "MIN_BLOCKSIZE",
    "ZERO",
    "ZERO_ALLOC",
    "CowFilter",
    "Overlay",
]

log = logging.getLogger("pynbd.filters.cow")


def _blocksize(text: str) -> int:
    from pynbd.backends import parse_size

    n = parse_size(text)
    if n < MIN_BLOCKSIZE or n > MAX_BLOCKSIZE or n & (n - 1):
        raise ValueError(f"must be a power of 2 from {MIN_BLOCKSIZE} to "
                         f"{MAX_BLOCKSIZE // (1024 * 1024)}M")
    return n


class CowFilter(Filter):
    """Copy-on-write overlay over a base that is never written."""

    params = {
        "blocksize": Param("copy-on-write granularity, a power of 2 from 512 to 32M "
                           "(default 64K; a named overlay keeps the one it was made with)",
                           _blocksize, None),
        "file": Param("keep the overlay in this file (its block map in FILE.map) across "
                      "restarts; default: an ephemeral overlay removed at exit", str, ""),
        "dir": Param("directory for the ephemeral overlay (default $TMPDIR or /tmp)",
                     str, ""),
    }

    read_only = False
    can_flush = True
    can_fua = True
    can_trim = True
    can_zero = True
    can_fast_zero = True
    can_cache = True
    can_extents = True
    #: one overlay and one map for every connection and every worker
    can_multi_conn = True
    #: flush and FUA write the overlay (and the map) out: on a thread
    slow_sync = True

    def __init__(self, next: Backend, blocksize: int | None = None, file: str = "",
                 dir: str = "", *, state: dict[str, Any] | None = None) -> None:
        super().__init__(next)
        size = int(next.size)
        if state is not None:
            self.ov = overlay_from_state(size, state)
        elif file:
            if dir:
                raise ConfigError("filter cow: dir= is for the ephemeral overlay; with "
                                  "file= the overlay is that file")
            self.ov = named_overlay(file, size, blocksize)
        else:
            self.ov = ephemeral_overlay(dir, size, blocksize or DEFAULT_BLOCKSIZE)
        self.bs = self.ov.bs
        self._size = size
        self._base_extents = bool(next.can_extents)

    # --- workers ------------------------------------------------------------------------

    def worker_state(self) -> dict[str, object] | None:
        return self.ov.worker_state()

    @classmethod
    def from_worker_state(cls, next: Backend, state: dict[str, Any],
                          **params: Any) -> Filter:
        return cls(next, **params, state=state)

    # --- capabilities -------------------------------------------------------------------

    @property
    def name(self) -> str:  # type: ignore[override]
        where = self.ov.path or "ephemeral"
        return f"cow({where}) over {self.next.name}"

    # --- reading ----------------------------------------------------------------------

    def _runs(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(state, start, end) runs covering ``offset .. offset+length``."""
        bs = self.bs
        end = offset + length
        first = offset // bs
        last = (end - 1) // bs
        m = self.ov.map
        if first == last:
            return [(m[first], offset, end)]
        states = m[first:last + 1]
        s0 = states[0]
        if states.count(s0) == len(states):
            return [(s0, offset, end)]
        out: list[tuple[int, int, int]] = []
        run_state = s0
        run_start = offset
        for i in range(1, len(states)):
            st = states[i]
            if st != run_state:
                edge = (first + i) * bs
                out.append((run_state, run_start, edge))
                run_state = st
                run_start = edge
        out.append((run_state, run_start, end))
        return out

    def _read(self, buf: memoryview, offset: int, nowait: bool) -> bool:
        if not len(buf):
            return True
        for st, s, e in self._runs(offset, len(buf)):
            piece = buf[s - offset:e - offset]
            if st == BASE:
                if nowait:
                    if not self.next.pread_nowait(piece, s):
                        return False
                else:
                    self.next.pread_into(piece, s)
            elif st == DATA:
                if nowait:
                    if not self.ov.file.pread_nowait(piece, s):
                        return False
                else:
                    self.ov.file.pread_into(piece, s)
            else:
                piece[:] = bytes(e - s)
        return True

    def pread_into(self, buf: memoryview, offset: int) -> None:
        n = len(buf)
        b = offset // self.bs
        if n and (offset + n - 1) // self.bs == b:  # one block: the common case
            st = self.ov.map[b]
            if st == BASE:
                self.next.pread_into(buf, offset)
            elif st == DATA:
                self.ov.file.pread_into(buf, offset)
            else:
                buf[:] = bytes(n)
            return
        self._read(buf, offset, False)

    def pread_nowait(self, buf: memoryview, offset: int) -> bool:
        n = len(buf)
        b = offset // self.bs
        if n and (offset + n - 1) // self.bs == b:
            st = self.ov.map[b]
            if st == BASE:
                return self.next.pread_nowait(buf, offset)
            if st == DATA:
                return self.ov.file.pread_nowait(buf, offset)
            buf[:] = bytes(n)
            return True
        return self._read(buf, offset, True)

    def resident(self, offset: int, length: int) -> bool:
        if length <= 0:
            return True
        for st, s, e in self._runs(offset, length):
            if st == BASE and not self.next.resident(s, e - s):
                return False
            if st == DATA and not self.ov.file.resident(s, e - s):
                return False
        return True

    def extents(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []

        def add(n: int, flags: int) -> None:
            if out and out[-1].flags == flags:
                out[-1] = Extent(out[-1].length + n, flags)
            else:
                out.append(Extent(n, flags))

        length = min(length, self._size - offset)
        if length <= 0:
            return [Extent(1, 0)]
        for st, s, e in self._runs(offset, length):
            if st == DATA:
                add(e - s, 0)
            elif st == ZERO:
                add(e - s, STATE_HOLE | STATE_ZERO)
            elif st == ZERO_ALLOC:
                add(e - s, STATE_ZERO)
            elif not self._base_extents:
                add(e - s, 0)
            else:
                pos = s
                for _ in range(4096):  # bounded: each round moves at least one byte
                    if pos >= e:
                        break
                    got = self.next.extents(pos, e - pos)
                    if not got:
                        break
                    for x in got:
                        n = min(x.length, e - pos)
                        if n <= 0:
                            break
                        add(n, x.flags & (STATE_HOLE | STATE_ZERO))
                        pos += n
                if pos < e:
                    add(e - pos, 0)
        return out

    def cache(self, offset: int, length: int) -> None:
        length = min(length, self._size - offset)
        if length <= 0:
            return
        for st, s, e in self._runs(offset, length):
            if st == BASE and self.next.can_cache:
                self.next.cache(s, e - s)
            elif st == DATA:
                self.ov.file.cache(s, e - s)

    # --- writing ----------------------------------------------------------------------

    def _copy_up(self, block: int, piece: memoryview | None, s: int, e: int) -> None:
        """Bytes ``s..e`` of ``block`` (all of it not covered) become ``piece`` (None:
        zeros), with the rest of the block kept: copy the block into the overlay first
        unless it is there already. Holds the block's lock while it copies."""
        ov = self.ov
        with ov.locks.hold(block):
            st = ov.map[block]
            if st == DATA:
                self._patch(piece, s, e)
                return
            if piece is None and st != BASE:
                return  # zeroing part of a block that reads as zeros
            bstart = block * self.bs
            bend = min(bstart + self.bs, self._size)
            blk = bytearray(bend - bstart)
            mv = memoryview(blk)
            if st == BASE:
                self.next.pread_into(mv, bstart)
            if piece is None:
                mv[s - bstart:e - bstart] = bytes(e - s)
            else:
                mv[s - bstart:e - bstart] = piece
            ov.file.pwrite(mv, bstart)
            ov.mark(block, block, DATA)
            ov.copy_ups += 1

    def _patch(self, piece: memoryview | None, s: int, e: int) -> None:
        """Bytes of a block that is in the overlay: written in place."""
        if piece is None:
            self.ov.file.pwrite(bytes(e - s), s)
        else:
            self.ov.file.pwrite(piece, s)

    def _partial(self, piece: memoryview | None, s: int, e: int) -> None:
        block = s // self.bs
        st = self.ov.map[block]
        if st == DATA:  # in the overlay for good: no copy, no lock
            self._patch(piece, s, e)
        elif piece is None and st != BASE:
            return
        else:
            self._copy_up(block, piece, s, e)

    def _split(self, offset: int, length: int) -> tuple[tuple[int, int] | None, int, int,
                                                     tuple[int, int] | None]:
        """(head partial block range, full blocks start, end, tail partial range)."""
        bs = self.bs
        end = offset + length
        size = self._size
        head = tail = None
        fs = -(-offset // bs) * bs  # first block boundary at or after offset
        fe = end if end == size else end // bs * bs  # the last block may be short
        if fs > fe:  # inside one block
            return (offset, end), 0, 0, None
        if offset < fs:
            head = (offset, fs)
        if fe < end:
            tail = (fe, end)
        return head, fs, fe, tail

    def pwrite(self, buf: memoryview | bytes, offset: int, fua: bool = False) -> None:
        n = len(buf)
        b = offset // self.bs
        if n and not fua and (offset + n - 1) // self.bs == b and self.ov.map[b] == DATA:
            self.ov.file.pwrite(buf, offset)  # the common case: a block already copied
            return
        mv = memoryview(buf)
        if n:
            head, fs, fe, tail = self._split(offset, n)
            if head is not None:
                self._partial(mv[:head[1] - offset], head[0], head[1])
            if fe > fs:
                self.ov.file.pwrite(mv[fs - offset:fe - offset], fs)
                self.ov.mark(fs // self.bs, (fe - 1) // self.bs, DATA)
            if tail is not None:
                self._partial(mv[tail[0] - offset:], tail[0], tail[1])
        if fua:
            self.flush()

    def zero(self, offset: int, length: int, may_trim: bool = True, fast: bool = False,
             fua: bool = False) -> None:
        if length <= 0:
            if fua:
                self.flush()
            return
        head, fs, fe, tail = self._split(offset, length)
        if fast:  # a partial block still in the base costs a copy: not fast
            for part in (head, tail):
                if part is not None and self.ov.map[part[0] // self.bs] == BASE:
                    raise BackendError(errno.ENOTSUP, "cow: zeroing part of a block that "
                                                      "is not in the overlay is not fast")
        if head is not None:
            self._partial(None, head[0], head[1])
        if fe > fs:
            first, last = fs // self.bs, (fe - 1) // self.bs
            if DATA in self.ov.map[first:last + 1]:
                self.ov.file.trim(fs, fe - fs)  # give the space back
            self.ov.mark(first, last, ZERO if may_trim else ZERO_ALLOC)
        if tail is not None:
            self._partial(None, tail[0], tail[1])
        if fua:
            self.flush()

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Trimmed bytes read as zeros (whole blocks become holes)."""
        self.zero(offset, length, may_trim=True, fast=False, fua=fua)

    def flush(self) -> None:
        self.ov.persist()

    # --- status and lifetime ----------------------------------------------------------

    def stats(self) -> dict[str, Any] | None:
        return {"copy_ups": self.ov.copy_ups}

    def close(self) -> None:
        ov = self.ov
        try:
            if ov.mapfile_fd is not None:
                ov.persist()
        except OSError as exc:
            log.error("cow: could not save the block map of %s: %s", ov.path, exc)
        finally:
            ov.close()
            self.next.close()
