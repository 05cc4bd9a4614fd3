"""The store behind the ``cow`` filter: the overlay file and its block map.

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
  ``file=`` sees the same disk. One server per overlay (an flock on PATH.map); a PATH.map
  that does not fit the export is refused with a ConfigError that says why.

Every worker process maps the same memfd map and writes the same overlay file
(:meth:`Overlay.worker_state` / :func:`overlay_from_state` pass the descriptors on).
What the filter does with the store (reads, copy-up, zeroing) is :mod:`pynbd.filters.cow`.
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

from pynbd.backends.base import ConfigError
from pynbd.backends.file import FileBackend
from pynbd.filters.blocklock import BlockLocks

# the messages belong to the cow filter, whichever of its modules writes them
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


class Overlay:
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

    def worker_state(self) -> dict[str, object]:
        """What a worker process needs to open the same overlay (:func:`overlay_from_state`)."""
        return {"blocksize": self.bs, "overlay_fd": self.file.fd, "map_fd": self.map_fd,
                "lock_fd": self.locks.fd, "mapfile_fd": self.mapfile_fd, "path": self.path,
                "fds": self.fds()}

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


def overlay_from_state(size: int, state: dict[str, Any]) -> Overlay:
    """A worker's view of the supervisor's overlay (:meth:`Overlay.worker_state`)."""
    return Overlay(size=size, blocksize=int(state["blocksize"]),
                   overlay_fd=int(state["overlay_fd"]), map_fd=int(state["map_fd"]),
                   lock_fd=int(state["lock_fd"]),
                   mapfile_fd=(None if state.get("mapfile_fd") is None
                               else int(state["mapfile_fd"])),
                   path=state.get("path"))


def ephemeral_overlay(directory: str, size: int, bs: int) -> Overlay:
    """An unnamed overlay in ``directory`` (default $TMPDIR) and a map in a memfd."""
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
    return Overlay(size=size, blocksize=bs, overlay_fd=ofd, map_fd=mfd, lock_fd=None,
                    mapfile_fd=None, path=None)


def named_overlay(path: str, size: int, blocksize: int | None) -> Overlay:
    """The overlay PATH and its map PATH.map, opened or created; the live map (a memfd)
    starts as the persisted one."""
    path = os.path.abspath(path)
    ofd, mapfile, bs = open_named(path, size, blocksize)
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
    ov = Overlay(size=size, blocksize=bs, overlay_fd=ofd, map_fd=mfd, lock_fd=None,
                  mapfile_fd=mapfile, path=path)
    log.info("cow: overlay %s (%d of %d blocks of %d bytes in it)", path,
             ov.map[:nblocks].count(DATA), nblocks, bs)
    return ov


def open_named(path: str, size: int, blocksize: int | None) -> tuple[int, int, int]:
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
