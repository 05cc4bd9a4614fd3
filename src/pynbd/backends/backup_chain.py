"""``backup:DIR [at=N] [verify=true]``: serve one point of a ``pynbd backup`` chain as a
read-only export, without restoring it first ("instant recovery": mount it, copy files
out, boot a VM from it with ``--filter cow`` on top).

The image as of backup N is the last full backup at or before N with the ranges of each
later backup up to N laid over it (backup/chain.py). At open the backend paints every
range of those backups into a map of 1 MiB pieces (no range of a chain crosses one), so
a read finds its sources with one dictionary lookup per MiB. Each source is read through
its own format (raw: ``pread``; qcow2: its cluster tables).

With ``verify`` (the default), the first read that touches a range reads the whole range
(at most 1 MiB) and checks it against the sha256 recorded at backup time; a range that
does not match fails that read with EIO (logged, naming the backup) and nothing else.
Ranges already checked are remembered, so later reads cost a plain read.

While it is served the chain is held for reading (the lock ``pynbd restore`` takes), so
``pynbd backup`` and ``pynbd prune`` of the chain wait their turn instead of changing
files under the server.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import threading

from pynbd.backends.base import (
    STATE_HOLE,
    STATE_ZERO,
    Backend,
    BackendError,
    ConfigError,
    Extent,
    Param,
    parse_bool,
    parse_params,
)
from pynbd.backup.chain import Backup, Chain, ChainError
from pynbd.backup.qcow2 import Qcow2Error, Qcow2Reader

log = logging.getLogger("pynbd.backends.backup")

#: one painted segment of a piece: [start, end) of the image, the source backup's
#: position in the plan (-1: zeros), and the range it came from (offset, length, sha256)
_Seg = tuple[int, int, int, int, int, str | None]


class _Source:
    """One backup's image, opened for reading."""

    def __init__(self, chain: Chain, b: Backup) -> None:
        self.backup = b
        path = chain.path(b.file)
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise BackendError(exc.errno or errno.EIO,
                               f"backup {b.index}: {path}: {exc.strerror}") from exc
        self.qcow2: Qcow2Reader | None = None
        self.lock = threading.Lock()
        if b.image_format == "qcow2":
            try:
                self.qcow2 = Qcow2Reader(self.fd, b.file, chain.size)
            except Qcow2Error as exc:
                os.close(self.fd)
                raise BackendError(errno.EIO, f"backup {b.index}: {exc}") from exc

    def read_into(self, view: memoryview, offset: int) -> None:
        if self.qcow2 is not None:
            with self.lock:  # its L2 table cache is not for several threads
                try:
                    data = self.qcow2.pread(offset, len(view))
                except Qcow2Error as exc:
                    raise BackendError(errno.EIO, f"backup {self.backup.index}: {exc}") from exc
            view[:] = data
            return
        got = os.preadv(self.fd, [view], offset)
        if got != len(view):
            raise BackendError(errno.EIO, f"backup {self.backup.index} "
                                          f"({self.backup.file}) is cut short at {offset + got}")

    def close(self) -> None:
        os.close(self.fd)


class BackupChainBackend(Backend):
    """A read-only export of one point of a backup chain."""

    params = {
        "at": Param("the backup to serve (its index; default: the last)", int, None),
        "verify": Param("check each range against its sha256 on first read (default true)",
                        parse_bool, True),
    }
    multi_process = True
    read_only = True
    can_multi_conn = True
    can_flush = False
    can_fua = False
    can_zero = False
    can_cache = False
    can_extents = True
    blocking = True

    def __init__(self, directory: str, at: int | None = None, verify: bool = True) -> None:
        self.dir = directory
        self.verify = verify
        self._lock_fd = _hold_for_reading(directory)
        self._sources: list[_Source] = []
        try:
            chain = Chain.open(directory)
            plan = chain.restore_plan(at)
            self.size = chain.size or 0
            self.piece = chain.piece
            self.point = plan[-1]
            self.name = f"backup:{directory}@{self.point.index}"
            self._sources = [_Source(chain, b) for b in plan]
            self._map = self._paint(chain, plan)
        except ChainError as exc:
            self.close()
            raise ConfigError(f"backup:{directory}: {exc}") from exc
        except BaseException:
            self.close()
            raise
        self._checked: set[tuple[int, int]] = set()
        self._checked_lock = threading.Lock()
        self.block_size = (1, 4096, 0xFFFFFFFF)

    @classmethod
    def open_target(cls, target: str, params: dict[str, str], read_only: bool) -> Backend:
        """``backup:DIR``, parameters ``at=N`` and ``verify=BOOL``."""
        values = parse_params("backup backend", cls.params, params)
        if not target:
            raise ConfigError("backup backend: no chain directory given (backup:DIR)")
        return cls(target, **values)

    def _paint(self, chain: Chain, plan: list[Backup]) -> dict[int, list[_Seg]]:
        pieces: dict[int, list[_Seg]] = {}
        piece = self.piece
        for src, b in enumerate(plan):
            for off, ln, digest in chain.ranges(b):
                end = off + ln
                if off < 0 or ln <= 0 or end > self.size or off // piece != (end - 1) // piece:
                    raise ChainError(f"backup {b.index}: range {off}+{ln} is not inside one "
                                     f"{piece}-byte piece of the {self.size}-byte image")
                new: _Seg = (off, end, src if digest is not None else -1, off, ln, digest)
                segs = pieces.setdefault(off // piece, [])
                kept: list[_Seg] = []
                for s in segs:  # cut what the new range covers out of what is there
                    if s[1] <= off or s[0] >= end:
                        kept.append(s)
                        continue
                    if s[0] < off:
                        kept.append((s[0], off, *s[2:]))
                    if s[1] > end:
                        kept.append((end, s[1], *s[2:]))
                kept.append(new)
                kept.sort()
                pieces[off // piece] = kept
        return pieces

    def _segments(self, offset: int, length: int) -> list[_Seg]:
        """The painted segments over [offset, offset+length), clipped, in order; gaps
        (never written by any backup of the plan: only possible in a chain whose full
        backup is missing ranges) read as zeros."""
        out: list[_Seg] = []
        end = offset + length
        pos = offset
        while pos < end:
            p = pos // self.piece
            stop = min(end, (p + 1) * self.piece)
            for s in self._map.get(p, ()):
                if s[1] <= pos or s[0] >= stop:
                    continue
                lo, hi = max(s[0], pos), min(s[1], stop)
                out.append((lo, hi, *s[2:]))
            pos = stop
        return out

    def _check(self, src: int, roff: int, rlen: int, digest: str) -> bytearray:
        s = self._sources[src]
        data = bytearray(rlen)
        s.read_into(memoryview(data), roff)
        if hashlib.sha256(data).hexdigest() != digest:
            b = s.backup
            msg = (f"backup {b.index} ({b.file}): the {rlen} bytes at offset {roff} do not "
                   "match the checksum recorded when they were backed up")
            log.error("%s: %s", self.name, msg)
            raise BackendError(errno.EIO, msg)
        with self._checked_lock:
            self._checked.add((src, roff))
        return data

    def pread_into(self, buf: memoryview, offset: int) -> None:
        if offset < 0 or offset + len(buf) > self.size:
            raise BackendError(errno.EINVAL, f"{offset}+{len(buf)} is outside the image")
        filled = offset
        for lo, hi, src, roff, rlen, digest in self._segments(offset, len(buf)):
            if lo > filled:  # a gap: zeros
                buf[filled - offset:lo - offset] = bytes(lo - filled)
            part = buf[lo - offset:hi - offset]
            if src < 0:
                part[:] = bytes(hi - lo)
            elif self.verify and digest is not None and (src, roff) not in self._checked:
                data = self._check(src, roff, rlen, digest)
                part[:] = data[lo - roff:hi - roff]
            else:
                self._sources[src].read_into(part, lo)
            filled = hi
        end = offset + len(buf)
        if filled < end:
            buf[filled - offset:] = bytes(end - filled)

    def pwrite(self, buf: memoryview | bytes, offset: int, fua: bool = False) -> None:
        raise BackendError(errno.EROFS, f"{self.name} is a backup: read-only")

    def extents(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        pos = offset
        for lo, hi, src, *_ in self._segments(offset, length):
            if lo > pos:
                out.append(Extent(lo - pos, STATE_HOLE | STATE_ZERO))
            out.append(Extent(hi - lo, STATE_HOLE | STATE_ZERO if src < 0 else 0))
            pos = hi
        if pos < offset + length:
            out.append(Extent(offset + length - pos, STATE_HOLE | STATE_ZERO))
        merged: list[Extent] = []
        for e in out:
            if merged and merged[-1].flags == e.flags:
                merged[-1] = Extent(merged[-1].length + e.length, e.flags)
            else:
                merged.append(e)
        return merged

    def close(self) -> None:
        for s in self._sources:
            s.close()
        self._sources = []
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _hold_for_reading(directory: str) -> int:
    """The chain's shared lock (see backup/chain.locked), held until close()."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"backup:{directory}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"backup:{directory} is in use: a pynbd backup or prune is "
                          "changing it; try again when it has finished") from None
    return fd
