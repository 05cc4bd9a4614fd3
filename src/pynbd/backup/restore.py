"""``pynbd restore``: rebuild the image as of any backup of a chain (backup/chain.py),
checking every range against the sha256 recorded when it was backed up.

The target is a file (created, or truncated and rebuilt), a block device, or an NBD
URI. The last full backup at or before the chosen one is written first, then each
later backup's ranges in order; zero ranges become holes (a fresh file), punched or
zeroed ranges (a device or an existing image's region) or WRITE_ZEROES (NBD). A range
whose bytes do not match their checksum stops the restore with an error naming it.
A qcow2 backup's ranges are read through its own cluster tables (backup/qcow2.py);
its backing file is not needed, the earlier backups of the plan supply the rest.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pynbd.backup.chain import Backup, Chain, ChainError, Range, locked
from pynbd.backup.qcow2 import Qcow2Error, Qcow2Reader


class RestoreError(Exception):
    """The restore failed (shown to the user, exit status 1)."""


@dataclass
class RestoreResult:
    at: int
    backups: list[Backup]
    data_bytes: int
    zero_bytes: int
    seconds: float


class _FileTarget:
    def __init__(self, path: str, size: int) -> None:
        self.path = path
        exists = os.path.exists(path)
        mode = os.stat(path).st_mode if exists else 0
        self.block = stat.S_ISBLK(mode)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if self.block:
            import fcntl
            import struct

            buf = fcntl.ioctl(self.fd, 0x80081272, b"\0" * 8)  # BLKGETSIZE64
            have = struct.unpack("Q", buf)[0]
            if have < size:
                os.close(self.fd)
                raise RestoreError(f"{path} holds {have} bytes; the image is {size}")
            self.fresh = False
        else:
            os.ftruncate(self.fd, 0)
            os.ftruncate(self.fd, size)
            self.fresh = True  # reads as zeros everywhere

    def write(self, offset: int, data: memoryview) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], offset + done)

    def zero(self, offset: int, length: int) -> None:
        from pynbd.backends.file import (
            FALLOC_FL_KEEP_SIZE,
            FALLOC_FL_PUNCH_HOLE,
            FALLOC_FL_ZERO_RANGE,
            fallocate,
        )

        modes = [FALLOC_FL_ZERO_RANGE] if self.block else \
            [FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE]
        for mode in modes:
            try:
                fallocate(self.fd, mode, offset, length)
                return
            except OSError:
                continue
        zeros = bytes(min(length, 1 << 20))
        end = offset + length
        while offset < end:
            n = min(len(zeros), end - offset)
            self.write(offset, memoryview(zeros)[:n])
            offset += n

    def finish(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class _NBDTarget:
    def __init__(self, uri: str, size: int, timeout: float | None) -> None:
        from pynbd.client import connect

        self.c = connect(uri, timeout=timeout, meta_contexts=())
        if self.c.is_read_only():
            self.c.close()
            raise RestoreError(f"{uri} is read-only")
        if self.c.size != size:
            have = self.c.size
            self.c.close()
            raise RestoreError(f"{uri} is {have} bytes; the image is {size}")
        self.fresh = False
        self.inflight = 0

    def _throttle(self) -> None:
        self.inflight += 1
        if self.inflight >= 16:
            req = self.c.wait_any()
            self.inflight -= 1
            if req.error is not None:
                raise req.error

    def write(self, offset: int, data: memoryview) -> None:
        step = self.c.max_request
        for pos in range(0, len(data), step):
            self.c.submit_write(offset + pos, bytes(data[pos:pos + step]))
            self._throttle()

    def zero(self, offset: int, length: int) -> None:
        if self.c.can_zero():
            self.c.submit_write_zeroes(offset, length)
            self._throttle()
            return
        zeros = memoryview(bytes(min(length, 1 << 20)))
        end = offset + length
        while offset < end:
            n = min(len(zeros), end - offset)
            self.write(offset, zeros[:n])
            offset += n

    def finish(self) -> None:
        self.c.wait_all()
        self.c.flush()
        self.c.close()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.c.hard_close()


def _reader(fd: int, b: Backup, size: int) -> Callable[[int, int], bytearray]:
    """How to read ``b``'s image: ``read(offset, length)``."""
    if b.image_format == "qcow2":
        try:
            q = Qcow2Reader(fd, b.file, size)
        except Qcow2Error as exc:
            raise RestoreError(f"backup {b.index}: {exc}: the backup is damaged") from exc

        def read_qcow2(off: int, ln: int) -> bytearray:
            try:
                return q.pread(off, ln)
            except Qcow2Error as exc:
                raise RestoreError(f"backup {b.index}: {exc}: the backup is damaged") from exc
        return read_qcow2

    def read_raw(off: int, ln: int) -> bytearray:
        buf = bytearray(ln)
        got = os.preadv(fd, [buf], off)
        return buf if got == ln else buf[:got]
    return read_raw


def _checked(chain: Chain, b: Backup, ranges: list[Range], then: str
             ) -> Iterator[tuple[int, int, bytearray | None]]:
    """Backup ``b``'s ranges in order: (offset, length, its bytes checked against their
    sha256, or None for a zero range). A mismatch is a RestoreError ending with
    ``then`` (what the failure leaves behind)."""
    size = chain.size
    assert size is not None
    src = chain.path(b.file)
    try:
        fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise RestoreError(f"backup {b.index}: {src}: {exc.strerror}") from exc
    try:
        read = _reader(fd, b, size)
        for off, ln, digest in ranges:
            if off < 0 or ln <= 0 or off + ln > size:
                raise RestoreError(f"backup {b.index}: range {off}+{ln} is outside "
                                   f"the {size}-byte image")
            if digest is None:
                yield off, ln, None
                continue
            buf = read(off, ln)
            if len(buf) != ln or hashlib.sha256(buf).hexdigest() != digest:
                raise RestoreError(
                    f"backup {b.index} ({b.file}): the {ln} bytes at offset {off} do not "
                    "match the checksum recorded when they were backed up: the backup is "
                    f"damaged; {then}")
            yield off, ln, buf
    finally:
        os.close(fd)


@dataclass
class VerifyResult:
    backups: list[Backup]
    data_bytes: int
    zero_bytes: int
    seconds: float


def verify(directory: str, at: int | None = None,
           progress: Callable[[int, int], None] | None = None) -> VerifyResult:
    """Read every data range of every backup (or of those that rebuild backup ``at``)
    and check it against its sha256; a RestoreError names the first damaged one."""
    with locked(directory, exclusive=False):
        return _verify(directory, at, progress)


def _verify(directory: str, at: int | None,
            progress: Callable[[int, int], None] | None) -> VerifyResult:
    t0 = time.monotonic()
    chain = Chain.open(directory)
    if not chain.backups:
        raise ChainError(f"{directory} holds no backup yet")
    plan = chain.backups if at is None else chain.restore_plan(at)
    work = [(b, chain.ranges(b)) for b in plan]
    total = sum(n for _, rs in work for _, n, h in rs if h is not None)
    data_bytes = zero_bytes = 0
    for b, ranges in work:
        for _off, ln, buf in _checked(chain, b, ranges, "later points need it"):
            if buf is None:
                zero_bytes += ln
                continue
            data_bytes += ln
            if progress is not None:
                progress(data_bytes, total)
    return VerifyResult(plan, data_bytes, zero_bytes, time.monotonic() - t0)


def restore(directory: str, target: str, at: int | None = None,
            progress: Callable[[int, int], None] | None = None,
            timeout: float | None = 60.0, lock: bool = True) -> RestoreResult:
    """Rebuild backup ``at`` (default: the last) into ``target``; ``lock``: hold the
    chain for reading (False: the caller, prune, holds it and writes its own temporary
    file in the directory). A target inside the chain's directory is refused."""
    if not lock:
        return _restore(directory, target, at, progress, timeout)
    if not _is_uri(target) and _inside(target, directory):
        raise RestoreError(f"{target} is inside the chain's directory {directory}: "
                           "restoring there could overwrite the backups; choose a target "
                           "outside it")
    with locked(directory, exclusive=False):
        return _restore(directory, target, at, progress, timeout)


def _is_uri(target: str) -> bool:
    from pynbd.client.uri import is_uri

    return is_uri(target)


def _inside(target: str, directory: str) -> bool:
    parent = os.path.dirname(os.path.abspath(target))
    try:
        return os.path.samefile(parent, directory)
    except OSError:
        return False


def _restore(directory: str, target: str, at: int | None,
             progress: Callable[[int, int], None] | None,
             timeout: float | None) -> RestoreResult:
    from pynbd.client.uri import is_uri

    t0 = time.monotonic()
    chain = Chain.open(directory)
    plan = chain.restore_plan(at)
    size = chain.size
    assert size is not None
    work = [(b, chain.ranges(b)) for b in plan]
    total = sum(n for _, rs in work for _, n, _h in rs)
    try:
        tgt: _FileTarget | _NBDTarget = (_NBDTarget(target, size, timeout) if is_uri(target)
                                         else _FileTarget(target, size))
    except OSError as exc:
        raise RestoreError(f"{target}: {exc.strerror or exc}") from exc
    data_bytes = zero_bytes = done = 0
    try:
        for k, (b, ranges) in enumerate(work):
            for off, ln, buf in _checked(chain, b, ranges, f"{target} is incomplete"):
                if buf is None:
                    if not (tgt.fresh and k == 0):
                        tgt.zero(off, ln)
                    zero_bytes += ln
                else:
                    tgt.write(off, memoryview(buf))
                    data_bytes += ln
                done += ln
                if progress is not None:
                    progress(done, total)
        tgt.finish()
    except OSError as exc:
        tgt.abort()
        if exc.errno == errno.ENOSPC:
            raise RestoreError(f"{target}: no space left") from exc
        raise RestoreError(f"{target}: {exc}") from exc
    except BaseException:
        tgt.abort()
        raise
    return RestoreResult(plan[-1].index, plan, data_bytes, zero_bytes, time.monotonic() - t0)


__all__ = ["ChainError", "RestoreError", "RestoreResult", "VerifyResult", "restore", "verify"]
