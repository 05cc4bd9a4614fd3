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

import bisect
import contextlib
import errno
import hashlib
import itertools
import logging
import os
import threading
from array import array

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
from pynbd.backup.chain import Backup, Chain, ChainError, locked
from pynbd.backup.qcow2 import Qcow2Error, Qcow2Reader

log = logging.getLogger("pynbd.backends.backup")

#: a piece of the image served by one source: [start, end) and the source's position in
#: the plan (-1: no backup wrote it, zeros)
_Seg = tuple[int, int, int]
_NOBODY = -1
_MIXED = -2  # more than one source: see the piece's entry in ``_mixed``


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

    def load_ranges(self, ranges: list[tuple[int, int, str | None]]) -> None:
        """The backup's ranges, compactly: offsets, lengths (negative: a zero range),
        32-byte digests, and a byte per range once it has been checked."""
        ranges = sorted(ranges)
        self.offs = array("q", (r[0] for r in ranges))
        self.lens = array("q", (r[1] if r[2] is not None else -r[1] for r in ranges))
        try:
            self.digests = b"".join(bytes.fromhex(r[2]) if r[2] is not None else bytes(32)
                                    for r in ranges)
        except ValueError:
            self.digests = b""
        if len(self.digests) != 32 * len(ranges):
            raise ChainError(f"backup {self.backup.index}: a sha256 is not 64 hex digits")
        self.checked = bytearray(len(ranges))

    def ranges_over(self, lo: int, hi: int) -> list[tuple[int, int, int, bool]]:
        """(range index, offset, length, zero?) of the ranges overlapping [lo, hi)."""
        offs, lens = self.offs, self.lens
        i = max(0, bisect.bisect_right(offs, lo) - 1)
        out: list[tuple[int, int, int, bool]] = []
        while i < len(offs) and offs[i] < hi:
            n = lens[i]
            if offs[i] + abs(n) > lo:
                out.append((i, offs[i], abs(n), n < 0))
            i += 1
        return out

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
        self._sources: list[_Source] = []
        # held until close(): backup and prune of the chain wait (see chain.locked)
        self._held = contextlib.ExitStack()
        try:
            self._held.enter_context(locked(directory, exclusive=False))
            chain = Chain.open(directory)
            plan = chain.restore_plan(at)
            self.size = chain.size or 0
            self.piece = chain.piece
            self.point = plan[-1]
            self.name = f"backup:{directory}@{self.point.index}"
            self._sources = [_Source(chain, b) for b in plan]
            self._paint(chain, plan)
        except ChainError as exc:
            self.close()
            raise ConfigError(f"backup:{directory}: {exc}") from exc
        except BaseException:
            self.close()
            raise
        self.block_size = (1, 4096, 0xFFFFFFFF)

    @classmethod
    def open_target(cls, target: str, params: dict[str, str], read_only: bool) -> Backend:
        """``backup:DIR``, parameters ``at=N`` and ``verify=BOOL``."""
        values = parse_params("backup backend", cls.params, params)
        if not target:
            raise ConfigError("backup backend: no chain directory given (backup:DIR)")
        return cls(target, **values)

    def _paint(self, chain: Chain, plan: list[Backup]) -> None:
        """Which backup serves each piece: ``_owner[piece]`` is the source that covers
        all of it, or _NOBODY, or _MIXED with the piece's segments in ``_mixed``."""
        piece = self.piece
        npieces = -(-self.size // piece)
        self._owner = array("h", [_NOBODY]) * npieces
        self._mixed: dict[int, list[_Seg]] = {}
        for src, b in enumerate(plan):
            ranges = chain.ranges(b)  # checked: each inside one piece of the image
            self._sources[src].load_ranges(ranges)
            by_piece: dict[int, list[tuple[int, int]]] = {}
            for off, ln, _h in ranges:
                by_piece.setdefault(off // piece, []).append((off, off + ln))
            for p, spans in by_piece.items():
                lo, hi = p * piece, min(self.size, (p + 1) * piece)
                spans.sort()
                if spans[0][0] == lo and spans[-1][1] == hi and all(
                        a[1] == b[0] for a, b in itertools.pairwise(spans)):
                    self._owner[p] = src  # covers the whole piece
                    self._mixed.pop(p, None)
                    continue
                segs = self._piece_segments(p)
                for s_lo, s_hi in spans:
                    segs = [part for seg in segs for part in _cut(seg, s_lo, s_hi)]
                    segs.append((s_lo, s_hi, src))
                segs.sort()
                self._owner[p] = _MIXED
                self._mixed[p] = segs

    def _piece_segments(self, p: int) -> list[_Seg]:
        owner = self._owner[p]
        if owner == _MIXED:
            return list(self._mixed[p])
        return [(p * self.piece, min(self.size, (p + 1) * self.piece), owner)]

    def _segments(self, offset: int, length: int) -> list[_Seg]:
        """The segments over [offset, offset+length), clipped, in order."""
        out: list[_Seg] = []
        end = offset + length
        pos = offset
        while pos < end:
            p = pos // self.piece
            stop = min(end, (p + 1) * self.piece)
            for lo, hi, src in self._piece_segments(p):
                if hi > pos and lo < stop:
                    out.append((max(lo, pos), min(hi, stop), src))
            pos = stop
        return out

    def _check(self, s: _Source, i: int, roff: int, rlen: int) -> bytearray:
        data = bytearray(rlen)
        s.read_into(memoryview(data), roff)
        if hashlib.sha256(data).digest() != s.digests[32 * i:32 * i + 32]:
            b = s.backup
            msg = (f"backup {b.index} ({b.file}): the {rlen} bytes at offset {roff} do not "
                   "match the checksum recorded when they were backed up")
            log.error("%s: %s", self.name, msg)
            raise BackendError(errno.EIO, msg)
        s.checked[i] = 1
        return data

    def pread_into(self, buf: memoryview, offset: int) -> None:
        if offset < 0 or offset + len(buf) > self.size:
            raise BackendError(errno.EINVAL, f"{offset}+{len(buf)} is outside the image")
        buf[:] = bytes(len(buf)) if len(buf) <= 1 << 20 else b"\0" * len(buf)
        for lo, hi, src in self._segments(offset, len(buf)):
            if src < 0:
                continue  # zeros already
            s = self._sources[src]
            for i, roff, rlen, zero in s.ranges_over(lo, hi):
                a, z = max(lo, roff), min(hi, roff + rlen)
                if zero or z <= a:
                    continue
                part = buf[a - offset:z - offset]
                if self.verify and not s.checked[i]:
                    part[:] = self._check(s, i, roff, rlen)[a - roff:z - roff]
                else:
                    s.read_into(part, a)

    def extents(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        for lo, hi, src in self._segments(offset, length):
            spans = [(lo, hi, True)] if src < 0 else [
                (max(lo, roff), min(hi, roff + rlen), zero)
                for _i, roff, rlen, zero in self._sources[src].ranges_over(lo, hi)]
            pos = lo
            for a, z, zero in spans:
                if a > pos:  # inside the source's piece but in none of its ranges
                    out.append(Extent(a - pos, STATE_HOLE | STATE_ZERO))
                out.append(Extent(z - a, STATE_HOLE | STATE_ZERO if zero else 0))
                pos = z
            if pos < hi:
                out.append(Extent(hi - pos, STATE_HOLE | STATE_ZERO))
        merged: list[Extent] = []
        for e in out:
            if merged and merged[-1].flags == e.flags:
                merged[-1] = Extent(merged[-1].length + e.length, e.flags)
            elif e.length:
                merged.append(e)
        return merged

    def pwrite(self, buf: memoryview | bytes, offset: int, fua: bool = False) -> None:
        raise BackendError(errno.EROFS, f"{self.name} is a backup: read-only")

    def close(self) -> None:
        for s in self._sources:
            s.close()
        self._sources = []
        self._held.close()


def _cut(seg: _Seg, lo: int, hi: int) -> list[_Seg]:
    """What is left of ``seg`` outside [lo, hi)."""
    a, z, src = seg
    if z <= lo or a >= hi:
        return [seg]
    return ([(a, lo, src)] if a < lo else []) + ([(hi, z, src)] if z > hi else [])
