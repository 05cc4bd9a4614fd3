"""The file backend (the embedded default): regular files and block devices.

Sparse-aware: SEEK_DATA/SEEK_HOLE for block status, fallocate(PUNCH_HOLE) for TRIM,
fallocate(ZERO_RANGE) for WRITE_ZEROES, fdatasync for FLUSH, RWF_DSYNC writes for FUA.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
import threading

from pynbd.backends.base import (
    STATE_HOLE,
    STATE_ZERO,
    Backend,
    BackendError,
    ConfigError,
    Extent,
    parse_params,
)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

_RWF_DSYNC = getattr(os, "RWF_DSYNC", 0)
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class FileBackend(Backend):
    can_multi_conn = True  # one fd, one page cache: a flush covers every connection
    can_extents = True
    slow_sync = True  # fdatasync
    blocking = False  # page-cache reads are tried without waiting (RWF_NOWAIT)

    def __init__(self, path: str, read_only: bool = False, fd: int | None = None) -> None:
        self.path = path
        self.name = f"file:{path}"
        if fd is None:
            flags = os.O_RDONLY if read_only else os.O_RDWR
            try:
                fd = os.open(path, flags | os.O_CLOEXEC)
            except OSError as exc:
                raise BackendError(exc.errno or errno.EIO,
                                   f"cannot open {path!r}: {exc.strerror}") from exc
        self.fd = fd
        st = os.fstat(self.fd)
        self.is_block = stat.S_ISBLK(st.st_mode)
        if not (self.is_block or stat.S_ISREG(st.st_mode)):
            os.close(self.fd)
            raise BackendError(errno.EINVAL,
                               f"{path!r} is neither a regular file nor a block device")
        self.size = os.lseek(self.fd, 0, os.SEEK_END) if self.is_block else st.st_size
        self.read_only = read_only
        self.can_trim = not read_only
        self.can_zero = not read_only
        self.rotational = self._rotational(st) if self.is_block else False
        self._punch_ok = True
        self._zero_range_ok = True
        self._seek_ok = not self.is_block
        self.can_fast_zero = not read_only
        self._lock = threading.Lock()
        #: the server may send reads straight from this fd with os.sendfile (zero-copy)
        #: (not for a subclass with reads of its own: sendfile would go around them)
        cls = type(self)
        own_reads = (cls.pread_into is FileBackend.pread_into
                     and cls.pread_nowait is FileBackend.pread_nowait)
        self.sendfile_fd: int | None = self.fd if own_reads else None
        #: ... and receive large WRITE payloads straight into it with splice (no filter
        #: passes this on: only a connection whose stack is this backend alone uses it;
        #: not for a subclass with writes of its own)
        self.splice_fd: int | None = (
            self.fd if not read_only and cls.pwrite is FileBackend.pwrite else None)
        self._nowait_ok = bool(_RWF_NOWAIT) and not self.is_block
        self._probe = bytearray(1)

    @classmethod
    def open_target(cls, target: str, params: dict[str, str], read_only: bool) -> Backend:
        """``PATH`` (a regular file or a block device); no parameters."""
        parse_params("file backend", {}, params)
        if not target:
            raise ConfigError("file backend: no path given")
        return cls(target, read_only=read_only)

    def worker_spec(self) -> dict[str, object] | None:
        # worker processes share this open file (and so its page cache): a FLUSH in
        # any of them covers writes made through all of them
        return {"kind": "file", "path": self.path, "fd": self.fd, "fds": [self.fd],
                "read_only": self.read_only}

    @staticmethod
    def _rotational(st: os.stat_result) -> bool:
        try:
            major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
            with open(f"/sys/dev/block/{major}:{minor}/queue/rotational") as f:
                return f.read().strip() == "1"
        except OSError:
            try:
                with open(f"/sys/dev/block/{major}:0/queue/rotational") as f:
                    return f.read().strip() == "1"
            except OSError:
                return False

    def pread_into(self, buf: memoryview, offset: int) -> None:
        n = len(buf)
        got = os.preadv(self.fd, [buf], offset)
        while got < n:
            more = os.preadv(self.fd, [buf[got:]], offset + got)
            if more == 0:  # file shrank underneath us: the rest reads as zeros
                buf[got:] = bytes(n - got)
                return
            got += more

    def pread_nowait(self, buf: memoryview, offset: int) -> bool:
        """Read from the page cache only (RWF_NOWAIT); False if it would touch the disk."""
        if not self._nowait_ok:
            self.pread_into(buf, offset)
            return True
        n = len(buf)
        try:
            got = os.preadv(self.fd, [buf], offset, _RWF_NOWAIT)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self._nowait_ok = False
                self.pread_into(buf, offset)
                return True
            raise
        if got == n:
            return True
        if got == 0 and offset >= self.size:
            buf[:] = bytes(n)
            return True
        return False  # partly cached: read the rest where blocking is fine

    def resident(self, offset: int, length: int) -> bool:
        """First and last byte of the range in the page cache (a cheap probe)."""
        if not self._nowait_ok or length <= 0:
            return True
        probe = self._probe
        try:
            if os.preadv(self.fd, [probe], offset, _RWF_NOWAIT) != 1:
                return False
            end = min(offset + length, self.size) - 1
            return end <= offset or os.preadv(self.fd, [probe], end, _RWF_NOWAIT) == 1
        except BlockingIOError:
            return False
        except OSError:
            return True

    def pwrite(self, buf: memoryview | bytes, offset: int, fua: bool = False) -> None:
        mv = memoryview(buf)
        n = len(mv)
        flags = _RWF_DSYNC if fua else 0
        done = os.pwritev(self.fd, [mv], offset, flags) if flags else os.pwrite(self.fd, mv, offset)
        while done < n:
            done += os.pwrite(self.fd, mv[done:], offset + done)
        if fua and not flags:
            os.fdatasync(self.fd)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        if not self._punch_ok or length == 0:
            return
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                self._punch_ok = False  # TRIM is advisory: succeed without effect
                return
            raise
        if fua:
            os.fdatasync(self.fd)

    def zero(self, offset: int, length: int, may_trim: bool = True, fast: bool = False,
             fua: bool = False) -> None:
        if length == 0:
            return
        done = False
        if may_trim and self._punch_ok and not self.is_block:
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                done = True
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._punch_ok = False
        # NO_HOLE without FAST_ZERO: write real zeros. fallocate(ZERO_RANGE) would leave
        # unwritten extents, which SEEK_DATA reports as holes on ext4 and xfs, and block
        # status would then contradict NO_HOLE. A fast zero with NO_HOLE may use it: the
        # blocks are allocated, which is what NO_HOLE protects.
        if not done and not may_trim and not fast and not self.is_block:
            super().zero(offset, length, may_trim, False, False)
            done = True
        if not done and self._zero_range_ok:
            try:
                mode = FALLOC_FL_ZERO_RANGE | (0 if self.is_block else FALLOC_FL_KEEP_SIZE)
                fallocate(self.fd, mode, offset, length)
                done = True
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                self._zero_range_ok = False
        if not done:
            if fast:
                raise BackendError(errno.ENOTSUP, f"{self.name}: no fast way to write zeros")
            super().zero(offset, length, may_trim, False, False)
        if fua:
            os.fdatasync(self.fd)

    def cache(self, offset: int, length: int) -> None:
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    def extents(self, offset: int, length: int) -> list[Extent]:
        end = min(offset + length, self.size)
        if not self._seek_ok or offset >= end:
            return [Extent(max(end - offset, 1), 0)]
        out: list[Extent] = []
        pos = offset
        fd = self.fd
        try:
            while pos < end and len(out) < 1024:
                try:
                    data = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:  # no data after pos: hole to EOF
                        data = end
                    else:
                        raise
                if data > pos:
                    out.append(Extent(min(data, end) - pos, STATE_HOLE | STATE_ZERO))
                    pos = min(data, end)
                    if pos >= end:
                        break
                hole = os.lseek(fd, pos, os.SEEK_HOLE)
                hole = min(hole, end)
                if hole <= pos:  # raced with a concurrent extension; report data
                    hole = end
                out.append(Extent(hole - pos, 0))
                pos = hole
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                self._seek_ok = False
                return [Extent(end - offset, 0)]
            raise
        return out

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
