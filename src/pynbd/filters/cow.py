"""``cow``: copy-on-write. Writes, trims and zeroes go to an overlay; the layer below
(the base) is only ever read. Specified in docs/filters.md.

The export is cut in blocks of ``blocksize`` bytes. A one-byte state per block, the
block map, says where the block's bytes are: still in the base, in the overlay, or
zero. The overlay is a sparse file of the export's size (block N at offset
N * blocksize):

- ephemeral (the default): an unnamed temporary file (O_TMPFILE, or created and
  unlinked at once) in ``dir=`` or $TMPDIR; nothing is left behind, even after a crash.
  The map lives in a memfd.
- named (``file=PATH``): the overlay is PATH and the map is persisted beside it in
  ``PATH.map`` at every flush (and at a clean stop), after the overlay's data, so the
  persisted map only ever points at data that is on disk. The next start with the same
  ``file=`` sees the same disk.

Every worker process maps the same memfd map and writes the same overlay file (the
supervisor's instance passes the descriptors on: :meth:`CowFilter.worker_state`).

A write that covers part of a block whose bytes are not in the overlay yet copies the
block up first (read the base block, patch it, write the whole block to the overlay,
then mark it), under a per-block lock shared by every thread and worker process
(:mod:`pynbd.filters.blocklock`), so two writes to different parts of the same new
block cannot undo each other. Writes to blocks already in the overlay go straight to it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import struct
import tempfile
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
from pynbd.backends.file import FileBackend
from pynbd.filters.base import Filter
from pynbd.filters.blocklock import BlockLocks

log = logging.getLogger("pynbd.filters.cow")

#: block states in the map
BASE = 0  # read the base
DATA = 1  # read the overlay
ZERO = 2  # reads as zeros; a hole (trimmed, or zeroed without NO_HOLE)
ZERO_ALLOC = 3  # reads as zeros; allocated (zeroed with NO_HOLE)

DEFAULT_BLOCKSIZE = 64 * 1024
MIN_BLOCKSIZE = 512
MAX_BLOCKSIZE = 32 * 1024 * 1024

#: PATH.map: a 4096-byte header, then one state byte per block
MAP_MAGIC = b"PYNBDCOW"
MAP_VERSION = 1
MAP_HEADER = struct.Struct("<8sIIQQ")  # magic, version, blocksize, export size, blocks
MAP_DATA_OFFSET = 4096

_ONES = b"\x01"


def _blocksize(text: str) -> int:
    from pynbd.backends import parse_size

    n = parse_size(text)
    if n < MIN_BLOCKSIZE or n > MAX_BLOCKSIZE or n & (n - 1):
        raise ValueError(f"must be a power of 2 from {MIN_BLOCKSIZE} to "
                         f"{MAX_BLOCKSIZE // (1024 * 1024)}M")
    return n


def _tmp_overlay(directory: str, size: int) -> int:
    """An unnamed sparse file of ``size`` bytes in ``directory``."""
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
        fd, name = tempfile.mkstemp(prefix="pynbd-cow-", dir=directory)
        os.unlink(name)
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        raise
    return fd


class _Overlay:
    """What every connection of a cow export in one process shares: the overlay file,
    the block map (a shared mapping), the block locks."""

    def __init__(self, *, size: int, blocksize: int, overlay_fd: int, map_fd: int,
                 lock_fd: int | None, mapfile_fd: int | None, path: str | None) -> None:
        self.size = size
        self.bs = blocksize
        self.nblocks = (size + blocksize - 1) // blocksize
        self.path = path
        self.file = FileBackend(path or "(cow overlay)", fd=overlay_fd)
        self.map_fd = map_fd
        #: one state byte per block, then the "changed since persisted" byte
        self.map = mmap.mmap(map_fd, self.nblocks + 1)
        self.locks = BlockLocks(lock_fd)
        #: the lock (a block number no block has) that serializes persisting the map
        self.persist_block = 1 << 62
        self.mapfile_fd = mapfile_fd
        #: blocks this process copied up from the base (status; shared by the
        #: per-connection copies of the filter)
        self.copy_ups = 0

    def fds(self) -> list[int]:
        out = [self.file.fd, self.map_fd, self.locks.fd]
        if self.mapfile_fd is not None:
            out.append(self.mapfile_fd)
        return out

    def mark(self, first: int, last: int, state: int) -> None:
        """Blocks ``first..last`` (inclusive) are now in ``state``."""
        m = self.map
        if first == last:
            if m[first] != state:
                m[first] = state
                m[self.nblocks] = 1
            return
        n = last - first + 1
        want = bytes([state]) * n
        if m[first:last + 1] != want:
            m[first:last + 1] = want
            m[self.nblocks] = 1

    def persist(self) -> None:
        """Make the overlay durable, then write the map entries that changed to PATH.map
        (named overlays). Entries are single bytes: a torn write leaves each one old or
        new, and both are backed by data already on disk."""
        if self.mapfile_fd is None:
            self.file.flush()
            return
        with self.locks.hold(self.persist_block):
            m = self.map
            n = self.nblocks
            changed = m[n] != 0
            m[n] = 0  # a change from now on marks it again: persisted next time
            snap = m[:n] if changed else b""
            self.file.flush()
            if not changed:
                return
            fd = self.mapfile_fd
            step = 1 << 20
            page = 4096
            for start in range(0, n, step):
                new = snap[start:start + step]
                old = os.pread(fd, len(new), MAP_DATA_OFFSET + start)
                if old == new:
                    continue
                for p in range(0, len(new), page):
                    chunk = new[p:p + page]
                    if old[p:p + page] != chunk:
                        os.pwrite(fd, chunk, MAP_DATA_OFFSET + start + p)
            os.fdatasync(fd)

    def close(self) -> None:
        try:
            self.map.close()
        except (BufferError, ValueError):
            pass
        for fd in (self.map_fd, self.mapfile_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.locks.close()
        self.file.close()


def _open_named(path: str, size: int, blocksize: int | None) -> tuple[int, int, int]:
    """Open or create the overlay PATH and its map PATH.map: (overlay fd, map file fd,
    blocksize). Refuses what does not fit this export (ConfigError)."""
    map_path = path + ".map"
    what = f"filter cow: file={path}"
    try:
        mfd = os.open(map_path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        mfd = -1
    except OSError as exc:
        raise ConfigError(f"{what}: cannot open {map_path}: {exc.strerror}") from None
    if mfd < 0:
        try:
            if os.path.getsize(path) > 0:
                raise ConfigError(f"{what}: {path} exists but has no block map {map_path}: "
                                  "it is not a cow overlay (remove it or name another file)")
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ConfigError(f"{what}: {exc.strerror}") from None
        bs = blocksize or DEFAULT_BLOCKSIZE
        nblocks = (size + bs - 1) // bs
        try:
            # the overlay gets its size only once the map exists: a crash in between
            # leaves an empty PATH (a fresh start) or a map and a short PATH (grown)
            ofd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            tmp = map_path + ".tmp"
            tfd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                header = MAP_HEADER.pack(MAP_MAGIC, MAP_VERSION, bs, size, nblocks)
                os.pwrite(tfd, header.ljust(MAP_DATA_OFFSET, b"\0"), 0)
                os.ftruncate(tfd, MAP_DATA_OFFSET + nblocks)
                os.fsync(tfd)
            finally:
                os.close(tfd)
            os.rename(tmp, map_path)
            dfd = os.open(os.path.dirname(os.path.abspath(map_path)), os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            mfd = os.open(map_path, os.O_RDWR | os.O_CLOEXEC)
            os.ftruncate(ofd, size)
        except OSError as exc:
            raise ConfigError(f"{what}: cannot create the overlay: "
                              f"{exc.strerror or exc}") from None
    else:
        _lock_map(mfd, what)
        try:
            bs = _check_map(mfd, map_path, what, size, blocksize)
            ofd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            os.close(mfd)
            raise ConfigError(f"{what}: the block map {map_path} exists but the overlay "
                              f"{path} does not") from None
        except OSError as exc:
            os.close(mfd)
            raise ConfigError(f"{what}: {exc.strerror or exc}") from None
        except ConfigError:
            os.close(mfd)
            raise
        if os.fstat(ofd).st_size < size:
            os.ftruncate(ofd, size)
        return ofd, mfd, bs
    try:
        _lock_map(mfd, what)
    except ConfigError:
        os.close(ofd)
        raise
    return ofd, mfd, bs


def _lock_map(mfd: int, what: str) -> None:
    """One server per overlay: an exclusive flock on PATH.map (workers inherit it)."""
    try:
        fcntl.flock(mfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(mfd)
        raise ConfigError(f"{what}: the overlay is in use by another process") from None


def _check_map(mfd: int, map_path: str, what: str, size: int,
               blocksize: int | None) -> int:
    raw = os.pread(mfd, MAP_HEADER.size, 0)
    if len(raw) < MAP_HEADER.size:
        raise ConfigError(f"{what}: {map_path} is not a cow block map (too short)")
    magic, version, bs, msize, nblocks = MAP_HEADER.unpack(raw)
    if magic != MAP_MAGIC:
        raise ConfigError(f"{what}: {map_path} is not a cow block map (bad magic)")
    if version != MAP_VERSION:
        raise ConfigError(f"{what}: {map_path} has map format version {version}; this "
                          f"pynbd reads version {MAP_VERSION}")
    if blocksize is not None and blocksize != bs:
        raise ConfigError(f"{what}: the overlay was made with blocksize={bs}; give "
                          f"blocksize={bs} (or none) or use a new file")
    if msize != size:
        raise ConfigError(f"{what}: the overlay was made for a {msize}-byte base; this "
                          f"base is {size} bytes")
    if bs < MIN_BLOCKSIZE or bs & (bs - 1) or nblocks != (size + bs - 1) // bs:
        raise ConfigError(f"{what}: {map_path} is corrupt (blocksize {bs}, "
                          f"{nblocks} blocks)")
    if os.fstat(mfd).st_size < MAP_DATA_OFFSET + nblocks:
        raise ConfigError(f"{what}: {map_path} is truncated")
    return int(bs)


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
            self.ov = _Overlay(size=size, blocksize=int(state["blocksize"]),
                               overlay_fd=int(state["overlay_fd"]),
                               map_fd=int(state["map_fd"]),
                               lock_fd=int(state["lock_fd"]),
                               mapfile_fd=(None if state.get("mapfile_fd") is None
                                           else int(state["mapfile_fd"])),
                               path=state.get("path"))
        elif file:
            if dir:
                raise ConfigError("filter cow: dir= is for the ephemeral overlay; with "
                                  "file= the overlay is that file")
            self.ov = self._named(file, size, blocksize)
        else:
            self.ov = self._ephemeral(dir, size, blocksize or DEFAULT_BLOCKSIZE)
        self.bs = self.ov.bs
        self._size = size
        self._base_extents = bool(next.can_extents)

    @staticmethod
    def _ephemeral(directory: str, size: int, bs: int) -> _Overlay:
        directory = directory or tempfile.gettempdir()
        if not os.path.isdir(directory):
            raise ConfigError(f"filter cow: dir={directory}: not a directory")
        try:
            ofd = _tmp_overlay(directory, size)
        except OSError as exc:
            raise ConfigError(f"filter cow: cannot make an overlay in {directory}: "
                              f"{exc.strerror or exc}") from None
        nblocks = (size + bs - 1) // bs
        mfd = os.memfd_create("pynbd-cow-map", os.MFD_CLOEXEC)
        os.ftruncate(mfd, nblocks + 1)
        return _Overlay(size=size, blocksize=bs, overlay_fd=ofd, map_fd=mfd, lock_fd=None,
                        mapfile_fd=None, path=None)

    @staticmethod
    def _named(path: str, size: int, blocksize: int | None) -> _Overlay:
        path = os.path.abspath(path)
        ofd, mapfile, bs = _open_named(path, size, blocksize)
        nblocks = (size + bs - 1) // bs
        mfd = os.memfd_create("pynbd-cow-map", os.MFD_CLOEXEC)
        os.ftruncate(mfd, nblocks + 1)
        done = 0
        step = 1 << 20
        while done < nblocks:  # the live map starts as the persisted one
            chunk = os.pread(mapfile, min(step, nblocks - done), MAP_DATA_OFFSET + done)
            if not chunk:
                break
            if chunk.strip(b"\0"):
                bad = set(chunk) - {BASE, DATA, ZERO, ZERO_ALLOC}
                if bad:
                    for fd in (ofd, mapfile, mfd):
                        os.close(fd)
                    raise ConfigError(f"filter cow: file={path}: {path}.map is corrupt "
                                      f"(block state {min(bad)})")
                os.pwrite(mfd, chunk, done)
            done += len(chunk)
        ov = _Overlay(size=size, blocksize=bs, overlay_fd=ofd, map_fd=mfd, lock_fd=None,
                      mapfile_fd=mapfile, path=path)
        log.info("cow: overlay %s (%d of %d blocks of %d bytes in it)", path,
                 ov.map[:nblocks].count(DATA), nblocks, bs)
        return ov

    # --- workers ------------------------------------------------------------------------

    def worker_state(self) -> dict[str, object] | None:
        ov = self.ov
        return {"blocksize": ov.bs, "overlay_fd": ov.file.fd, "map_fd": ov.map_fd,
                "lock_fd": ov.locks.fd, "mapfile_fd": ov.mapfile_fd, "path": ov.path,
                "fds": ov.fds()}

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
