"""A disk kept as a directory of fixed-size chunk files, one per block of the disk,
created on first write: the layout object-store-backed disks use (one object per chunk,
missing objects read as zeros).

    pynbd serve python:examples/plugins/chunkdir.py dir=/srv/disk1 size=10G [chunk=1M]

Chunk ``i`` (bytes ``i*chunk`` to ``(i+1)*chunk``) is the file ``%016x`` % i in ``dir``.

- Reads of a missing chunk are zeros; writes create it (``O_EXCL``, then extend it to
  the chunk size: two writers racing to create the same chunk both keep their bytes).
- TRIM and WRITE_ZEROES of a whole chunk delete its file; of part of a chunk, punch a
  hole in it (``fallocate``). Block status reports missing chunks as holes.
- FLUSH fsyncs the chunks written since the last flush, then the directory.

Every call does file I/O that may wait for a disk, so the server calls it on worker
threads (``blocking = True``). All state is in the file system, so every worker process
of ``pynbd serve --workers N`` may open the directory (``multi_process = True``): there
is no cache of open files or of which chunks exist that another process could make
stale. Which chunks are unflushed is shared too, in the kernel: a one-byte-per-chunk map
(``.dirty``) that every process maps. So a FLUSH through any connection, served by any
process, covers the writes every connection completed before it (``can_multi_conn``).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
from collections.abc import Iterator

from pynbd.backends import (
    STATE_HOLE,
    STATE_ZERO,
    Backend,
    BackendError,
    ConfigError,
    Extent,
    Param,
    parse_size,
)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE = 0x01, 0x02, 0x10
O_CLOEXEC = os.O_CLOEXEC
#: how many chunks one block-status call looks at (the client asks again for the rest)
EXTENTS_SCAN = 4096


def fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """Linux fallocate(2); False when the file system cannot do it."""
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


class ChunkDir(Backend):
    params = {
        "dir": Param("directory of the chunk files (created if missing)"),
        "size": Param("size of the disk, e.g. 10G", parse_size),
        "chunk": Param("size of one chunk file, a power of two >= 4K (default 1M)",
                       parse_size, 1 << 20),
    }
    blocking = True
    multi_process = True
    can_multi_conn = True
    can_trim = True
    can_zero = True
    can_fast_zero = True
    can_extents = True

    def __init__(self, dir: str, size: int, chunk: int) -> None:
        if chunk < 4096 or chunk & (chunk - 1):
            raise ConfigError(f"chunk={chunk}: must be a power of two of at least 4096")
        if size <= 0:
            raise ConfigError("size must be more than 0")
        self.name = f"chunkdir:{dir}"
        self.size = size
        self.chunk = chunk
        self.nchunks = (size + chunk - 1) // chunk
        if os.path.exists(dir) and not os.path.isdir(dir):
            raise ConfigError(f"dir={dir}: not a directory")
        os.makedirs(dir, exist_ok=True)
        self.dirfd = os.open(dir, os.O_RDONLY | os.O_DIRECTORY | O_CLOEXEC)
        self._check_layout()
        # byte 0: the directory changed; byte 1 + i: chunk i was written (unflushed)
        fd = os.open(".dirty", os.O_RDWR | os.O_CREAT | O_CLOEXEC, 0o644, dir_fd=self.dirfd)
        try:
            if os.fstat(fd).st_size < 1 + self.nchunks:
                os.ftruncate(fd, 1 + self.nchunks)
            self.dirty = mmap.mmap(fd, 1 + self.nchunks)
        finally:
            os.close(fd)
        self.zeros = memoryview(bytes(chunk))

    def _check_layout(self) -> None:
        """Refuse to reopen a directory with another chunk size (its data would move)."""
        want = f"chunk={self.chunk}\n".encode()
        try:
            fd = os.open(".layout", os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_CLOEXEC, 0o644,
                         dir_fd=self.dirfd)
        except FileExistsError:
            fd = os.open(".layout", os.O_RDONLY | O_CLOEXEC, dir_fd=self.dirfd)
            have = os.read(fd, 100)
            os.close(fd)
            if have and have != want:
                raise ConfigError(f"{self.name} holds chunks of {have.decode().strip()} "
                                  f"bytes, not chunk={self.chunk}") from None
            return
        os.write(fd, want)
        os.close(fd)

    # --- helpers ------------------------------------------------------------------------

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(chunk, offset in the chunk, length) for every chunk the range touches."""
        end = offset + length
        while offset < end:
            i, o = divmod(offset, self.chunk)
            n = min(self.chunk - o, end - offset)
            yield i, o, n
            offset += n

    def _chunk_len(self, i: int) -> int:
        return min(self.chunk, self.size - i * self.chunk)

    def _open(self, i: int, flags: int, create: bool = False) -> int | None:
        """An fd of chunk ``i``; None if it does not exist and ``create`` is false."""
        name = f"{i:016x}"
        for _ in range(100):  # each turn another process deleted or created it meanwhile
            try:
                return os.open(name, flags | O_CLOEXEC, dir_fd=self.dirfd)
            except FileNotFoundError:
                if not create:
                    return None
            try:
                fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | O_CLOEXEC, 0o644,
                             dir_fd=self.dirfd)
            except FileExistsError:
                continue  # another writer created it first: use theirs
            # extending never drops bytes a racing writer already put there
            os.ftruncate(fd, self._chunk_len(i))
            self.dirty[0] = 1
            return fd
        raise BackendError(errno.EIO, f"{self.name}: chunk {i} keeps appearing and vanishing")

    def _delete(self, i: int) -> None:
        try:
            os.unlink(f"{i:016x}", dir_fd=self.dirfd)
        except FileNotFoundError:
            return
        self.dirty[0] = 1

    # --- the data path ------------------------------------------------------------------

    def pread_into(self, buf: memoryview, offset: int) -> None:
        pos = 0
        for i, o, n in self._pieces(offset, len(buf)):
            piece = buf[pos:pos + n]
            pos += n
            fd = self._open(i, os.O_RDONLY)
            if fd is None:
                piece[:] = self.zeros[:n]
                continue
            try:
                got = 0
                while got < n:
                    k = os.preadv(fd, [piece[got:]], o + got)
                    if k == 0:  # past the end of a short chunk file
                        piece[got:] = self.zeros[:n - got]
                        break
                    got += k
            finally:
                os.close(fd)

    def pwrite(self, buf: memoryview | bytes, offset: int, fua: bool = False) -> None:
        data = memoryview(buf)
        pos = 0
        for i, o, n in self._pieces(offset, len(data)):
            fd = self._open(i, os.O_RDWR, create=True)
            assert fd is not None
            try:
                done = 0
                while done < n:
                    done += os.pwritev(fd, [data[pos + done:pos + n]], o + done)
                if fua:
                    os.fdatasync(fd)
            finally:
                os.close(fd)
            pos += n
            self.dirty[1 + i] = 1  # after the write: a flush that clears it has its data
        if fua:
            os.fsync(self.dirfd)  # in case the write created a chunk

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        for i, o, n in self._pieces(offset, length):
            if n == self._chunk_len(i):
                self._delete(i)
                continue
            fd = self._open(i, os.O_RDWR)
            if fd is not None:
                try:
                    fallocate(fd, PUNCH_HOLE | KEEP_SIZE, o, n)  # advisory: may not happen
                    self.dirty[1 + i] = 1
                finally:
                    os.close(fd)
        if fua:
            self.flush()

    def zero(self, offset: int, length: int, may_trim: bool = True, fast: bool = False,
             fua: bool = False) -> None:
        for i, o, n in self._pieces(offset, length):
            if may_trim and n == self._chunk_len(i):
                self._delete(i)
                continue
            fd = self._open(i, os.O_RDWR, create=not may_trim)  # NO_HOLE: the bytes stay allocated
            if fd is None:
                continue  # a missing chunk reads as zeros already
            try:
                if not fallocate(fd, (PUNCH_HOLE if may_trim else ZERO_RANGE) | KEEP_SIZE,
                                 o, n):
                    if fast:
                        raise BackendError(errno.ENOTSUP, f"{self.name}: no fast zeroing")
                    os.pwrite(fd, self.zeros[:n], o)
                self.dirty[1 + i] = 1
            finally:
                os.close(fd)
        if fua:
            self.flush()

    def flush(self) -> None:
        # one flush at a time, in any thread of any process: a flush must not return
        # while another one that took a mark off a chunk is still syncing it
        lock = os.open(".dirty", os.O_RDONLY | O_CLOEXEC, dir_fd=self.dirfd)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            dirty = self.dirty
            i = dirty.find(b"\x01", 1)
            while i != -1:
                dirty[i] = 0  # before the sync: a write landing meanwhile marks it again
                fd = self._open(i - 1, os.O_RDONLY)
                if fd is not None:  # else deleted since: nothing to sync
                    try:
                        os.fdatasync(fd)
                    finally:
                        os.close(fd)
                i = dirty.find(b"\x01", i + 1)
            if dirty[0]:
                dirty[0] = 0
                os.fsync(self.dirfd)  # new and deleted chunk files
        finally:
            os.close(lock)  # and the lock with it

    def extents(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        for i, _o, n in self._pieces(offset, min(length, EXTENTS_SCAN * self.chunk)):
            try:
                os.stat(f"{i:016x}", dir_fd=self.dirfd)
                flags = 0
            except FileNotFoundError:
                flags = STATE_HOLE | STATE_ZERO
            if out and out[-1].flags == flags:
                out[-1] = Extent(out[-1].length + n, flags)
            else:
                out.append(Extent(n, flags))
        return out

    def close(self) -> None:
        self.dirty.close()
        os.close(self.dirfd)
