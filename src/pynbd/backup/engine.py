"""``pynbd backup``: copy an export (best: a point-in-time view, ``NAME@CHECKPOINT``) into
a backup chain (backup/chain.py): everything the first time, afterwards only the ranges
its ``qemu:dirty-bitmap`` context marks dirty.

Which bitmap: the one named after the last backup's checkpoint (a view
``disk@c2`` serves the frozen bitmap ``c1``: every change since checkpoint ``c1``,
which the previous backup, of ``disk@c1``, saw), or the one given with ``--bitmap``
(e.g. a qemu-nbd ``-B`` export). A bitmap the server refuses (inconsistent) or lacks
is an error telling the user to take a full backup: never a silently incomplete one.

The copy runs on several connections (when the export allows: read-only or
CAN_MULTI_CONN), each with many reads in flight; ranges the source reports as zeros
(``base:allocation``) and all-zero data are recorded as zero ranges, not written.

The data goes into a sparse raw file, or (``--format qcow2``) a qcow2 image whose
backing file is the previous backup (backup/qcow2.py). A qcow2 image works in whole
64 KiB clusters, so the ranges to copy are widened to cluster boundaries first (the
source is a point-in-time view: reading a few unchanged bytes more is harmless).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynbd.backup.chain import (
    IMAGE_FORMATS,
    Backup,
    Chain,
    ChainError,
    Range,
    locked,
    split,
)
from pynbd.backup.qcow2 import CLUSTER, Qcow2Error, Qcow2Writer
from pynbd.protocol.constants import BASE_ALLOCATION
from pynbd.util.zeros import is_zero

DIRTY_PREFIX = "qemu:dirty-bitmap:"
DEFAULT_CONNECTIONS = 4
DEFAULT_REQUESTS = 8
COMPRESS_LEVEL = 6
STATE_ZERO = 2


class BackupError(Exception):
    """The backup cannot be taken (shown to the user, exit status 1)."""


@dataclass
class BackupOptions:
    full: bool = False
    #: the dirty bitmap to use (name without the qemu:dirty-bitmap: prefix)
    bitmap: str | None = None
    #: the checkpoint this backup is of (default: after '@' in the export name)
    checkpoint: str | None = None
    connections: int = DEFAULT_CONNECTIONS
    requests: int = DEFAULT_REQUESTS
    timeout: float | None = 60.0
    progress: Callable[[int, int], None] | None = None
    #: "raw" or "qcow2"; None: the format of the chain's last backup (raw for a new one)
    format: str | None = None
    #: deflate qcow2 data clusters (zlib level 6, as qemu-img convert -c); None: as the
    #: chain's last backup when it is qcow2
    compress: bool | None = None


@dataclass
class BackupResult:
    backup: Backup
    ranges: int
    seconds: float


def _open(uri: str, contexts: tuple[str, ...], timeout: float | None):  # type: ignore[no-untyped-def]
    """A connection with exactly ``contexts`` negotiated; a context the server refuses
    or lacks is a BackupError naming it (with the server's reason)."""
    from pynbd.client import Client, OptionError

    try:
        c = Client.dial(uri, timeout=timeout)
    except OSError as exc:
        raise BackupError(f"{uri}: cannot connect: {exc.strerror or exc}") from exc
    try:
        c.connect()
        if not (c.extended_headers() or c.structured_replies()):
            raise BackupError(f"{uri}: the server has no structured replies: it cannot "
                              "report allocation or dirty bitmaps")
        try:
            got = {m.name for m in c.set_meta_context(*contexts)}
        except OptionError as exc:
            hint = ("; take a full backup (--full)"
                    if any(x.startswith(DIRTY_PREFIX) for x in contexts) else "")
            raise BackupError(f"{uri}: the server refused the metadata contexts "
                              f"{', '.join(contexts)}: {exc.message or exc}{hint}") from exc
        missing = [x for x in contexts if x not in got]
        if missing:
            hint = ("; the changes since the last backup are unknown: take a full backup "
                    "(--full)" if any(x.startswith(DIRTY_PREFIX) for x in missing) else "")
            raise BackupError(f"{uri}: the server does not offer {', '.join(missing)}{hint}")
        c.negotiate_safe_close()
        c.go()
    except BaseException:
        c.hard_close()
        raise
    return c


def _list_bitmaps(uri: str, timeout: float | None) -> list[str]:
    from pynbd.client import Client, OptionError

    try:
        c = Client.dial(uri, timeout=timeout)
    except OSError as exc:
        raise BackupError(f"{uri}: cannot connect: {exc.strerror or exc}") from exc
    try:
        c.connect()
        if not (c.extended_headers() or c.structured_replies()):
            return []
        try:
            return [m.name[len(DIRTY_PREFIX):] for m in c.list_meta_context(DIRTY_PREFIX)
                    if m.name.startswith(DIRTY_PREFIX)]
        except OptionError:
            return []
    finally:
        with contextlib.suppress(Exception):
            c.abort()
        c.hard_close()


def choose_bitmap(uri: str, chain: Chain, opts: BackupOptions) -> str | None:
    """The bitmap of an incremental backup, None for a full one."""
    last = chain.last
    if opts.full or last is None:
        return None
    if opts.bitmap:
        return opts.bitmap
    offered = _list_bitmaps(uri, opts.timeout)
    if last.checkpoint is None:
        raise BackupError(
            f"the last backup in {chain.dir} (#{last.index}) has no checkpoint name, so "
            "which bitmap holds the changes since it is unknown: give --bitmap NAME (one "
            "that has every change since that backup), or --full"
            + (f"; the source offers bitmaps: {', '.join(offered)}" if offered else ""))
    if last.checkpoint not in offered and offered:
        raise BackupError(
            f"the last backup in {chain.dir} is of checkpoint {last.checkpoint!r}, but the "
            f"source offers the changes since {', '.join(map(repr, offered))}: the changes "
            f"since {last.checkpoint!r} are unknown; take a full backup (--full)")
    # not offered at all: asking for it gives the server's reason (e.g. inconsistent)
    return last.checkpoint


def _extents(c, context: str, size: int) -> list[tuple[int, int, int]]:  # type: ignore[no-untyped-def]
    return [(e.offset, e.length, e.flags) for e in c.iter_extents(0, size, context=context)]


def _plan(c, size: int, bitmap: str | None) -> tuple[list[tuple[int, int]],  # type: ignore[no-untyped-def]
                                                      list[tuple[int, int]]]:
    """(ranges to read, ranges known to be zero), in offset order."""
    alloc = _extents(c, BASE_ALLOCATION, size)
    if bitmap is None:
        wanted = [(0, size)] if size else []
    else:
        wanted = [(o, n) for o, n, f in _extents(c, DIRTY_PREFIX + bitmap, size) if f & 1]
    read: list[tuple[int, int]] = []
    zero: list[tuple[int, int]] = []
    i = 0
    for off, ln in wanted:
        end = off + ln
        pos = off
        while i < len(alloc) and alloc[i][0] + alloc[i][1] <= pos:
            i += 1
        j = i
        while pos < end and j < len(alloc):
            a_off, a_len, a_flags = alloc[j]
            stop = min(end, a_off + a_len)
            if stop > pos:
                (zero if a_flags & STATE_ZERO else read).append((pos, stop - pos))
                pos = stop
            if a_off + a_len <= pos:
                j += 1
        if pos < end:  # allocation did not cover it: read it
            read.append((pos, end - pos))
    return _coalesce(read), _coalesce(zero)


def _cluster_plan(read: list[tuple[int, int]], zero: list[tuple[int, int]], cs: int,
                  size: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The plan widened to whole clusters (the last may end at ``size``): a cluster all
    of whose bytes are zero ranges stays zero, every other cluster touched is read."""
    touched: list[list[int]] = []
    for o, n in sorted(read + zero):
        lo, hi = o // cs * cs, min(size, -(-(o + n) // cs) * cs)
        if touched and lo <= touched[-1][1]:
            touched[-1][1] = max(touched[-1][1], hi)
        else:
            touched.append([lo, hi])
    inner: list[tuple[int, int]] = []
    for o, n in zero:
        lo = -(-o // cs) * cs
        hi = size if o + n == size else (o + n) // cs * cs
        if hi > lo:
            inner.append((lo, hi))
    out: list[tuple[int, int]] = []
    j = 0
    for lo, hi in touched:
        pos = lo
        while j < len(inner) and inner[j][1] <= pos:
            j += 1
        k = j
        while k < len(inner) and inner[k][0] < hi:
            if inner[k][0] > pos:
                out.append((pos, inner[k][0] - pos))
            pos = max(pos, inner[k][1])
            k += 1
        if pos < hi:
            out.append((pos, hi - pos))
    return _coalesce(out), [(lo, hi - lo) for lo, hi in inner]


def _choose_format(chain: Chain, bitmap: str | None, opts: BackupOptions
                   ) -> tuple[str, bool]:
    """(image format, compressed) of the next backup."""
    last = chain.last
    fmt = opts.format or (last.image_format if last is not None else "raw")
    if fmt not in IMAGE_FORMATS:
        raise BackupError(f"unknown backup format {fmt!r} (raw or qcow2)")
    compress = opts.compress if opts.compress is not None else bool(
        fmt == "qcow2" and last is not None and last.extra.get("compressed"))
    if compress and fmt != "qcow2":
        raise BackupError("--compress needs --format qcow2 (a raw backup cannot be "
                          "compressed)")
    if fmt == "qcow2" and bitmap is not None and last is not None and (
            last.image_format == "raw" and last.type != "full"):
        raise BackupError(
            f"the last backup in {chain.dir} (#{last.index}, {last.file}) is a raw "
            "incremental one, which qemu cannot use as a backing file: start a qcow2 "
            "chain with a full backup (--full --format qcow2), or keep --format raw")
    return fmt, compress


class _RawSink:
    """A sparse raw file: data at its offset, zeros left as holes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, off: int, view: memoryview) -> None:
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], off + done)

    def zero(self, off: int, n: int) -> None:
        pass


def _coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, ln in ranges:
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + ln)
        else:
            out.append((off, ln))
    return out


class _Copy:
    """Read pieces on several connections, many in flight each; hash and store them."""

    def __init__(self, uri: str, contexts: tuple[str, ...], first, pieces: list[tuple[int, int]],  # type: ignore[no-untyped-def]
                 sink: _RawSink | Qcow2Writer, piece: int, opts: BackupOptions) -> None:
        self.uri = uri
        self.contexts = contexts
        self.first = first
        self.queue = deque(pieces)
        self.sink = sink
        self.piece = piece
        self.opts = opts
        self.lock = threading.Lock()
        self.results: dict[int, Range] = {}
        self.done_bytes = 0
        self.total = sum(n for _, n in pieces)
        self.error: BaseException | None = None
        self.zero = bytes(piece)

    def _next(self) -> tuple[int, int] | None:
        with self.lock:
            if self.error is not None or not self.queue:
                return None
            return self.queue.popleft()

    def _store(self, off: int, view: memoryview) -> None:
        n = len(view)
        if is_zero(view):
            rng: Range = (off, n, None)
            self.sink.zero(off, n)
        else:
            digest = hashlib.sha256(view).hexdigest()
            self.sink.write(off, view)
            rng = (off, n, digest)
        with self.lock:
            self.results[off] = rng
            self.done_bytes += n
            done_bytes = self.done_bytes
        if self.opts.progress is not None:
            self.opts.progress(done_bytes, self.total)

    def _worker(self, c) -> None:  # type: ignore[no-untyped-def]
        free = [memoryview(bytearray(self.piece)) for _ in range(max(1, self.opts.requests))]
        inflight: dict[int, tuple[int, memoryview]] = {}
        try:
            while True:
                while free:
                    nxt = self._next()
                    if nxt is None:
                        break
                    off, n = nxt
                    buf = free.pop()
                    req = c.submit_read(off, buf[:n])
                    inflight[id(req)] = (off, buf)
                if not inflight:
                    return
                req = c.wait_any()
                off, buf = inflight.pop(id(req))
                if req.error is not None:
                    raise BackupError(f"reading {req.length} bytes at offset {off}: "
                                      f"{req.error}")
                self._store(off, buf[:req.length])
                free.append(buf)
        except BaseException as exc:
            with self.lock:
                if self.error is None:
                    self.error = exc

    def run(self, nconn: int) -> None:
        conns = [self.first]
        threads = []
        try:
            for _ in range(nconn - 1):
                if len(self.queue) <= len(conns) * self.opts.requests:
                    break
                conns.append(_open(self.uri, self.contexts, self.opts.timeout))
            for c in conns:
                t = threading.Thread(target=self._worker, args=(c,), daemon=True,
                                     name="backup-reader")
                t.start()
                threads.append(t)
            for t in threads:
                t.join()
        finally:
            for c in conns[1:]:
                with contextlib.suppress(Exception):
                    c.close()
        if self.error is not None:
            if isinstance(self.error, BackupError):
                raise self.error
            raise BackupError(str(self.error)) from self.error


def _write_image(c, uri: str, contexts: tuple[str, ...], chain: Chain, path: str,  # type: ignore[no-untyped-def]
                 size: int, read: list[tuple[int, int]], zero: list[tuple[int, int]],
                 backing: Backup | None, fmt: str, opts: BackupOptions) -> _Copy:
    """Copy ``read`` into a new image file at ``path`` (fsynced; removed on failure)."""
    pieces = [p for off, ln in read for p in split(off, ln, chain.piece)]
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        sink: _RawSink | Qcow2Writer
        if fmt == "qcow2":
            try:
                sink = Qcow2Writer(fd, size, backing.file if backing else None,
                                   backing.image_format if backing else None,
                                   COMPRESS_LEVEL if opts.compress else None)
            except Qcow2Error as exc:
                raise BackupError(f"{exc}: use --format raw") from exc
        else:
            os.ftruncate(fd, size)
            sink = _RawSink(fd)
        for off, ln in zero:
            sink.zero(off, ln)
        nconn = opts.connections if (c.is_read_only() or c.can_multi_conn()) else 1
        cp = _Copy(uri, contexts, c, pieces, sink, chain.piece, opts)
        cp.run(nconn)
        if isinstance(sink, Qcow2Writer):
            sink.finish()
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)
    return cp


def backup(uri: str, directory: str, opts: BackupOptions | None = None) -> BackupResult:
    """Take one backup of ``uri`` into the chain in ``directory`` (holding the chain:
    another backup or prune of it at the same time is refused)."""
    with locked(directory, exclusive=True, create=True):
        return _backup(uri, directory, opts or BackupOptions())


def _backup(uri: str, directory: str, opts: BackupOptions) -> BackupResult:
    from pynbd.client import parse_uri

    if opts.connections < 1 or opts.requests < 1:
        raise BackupError("--connections and --requests must be at least 1")
    try:
        export = parse_uri(uri).export or ""
    except ValueError as exc:
        raise BackupError(str(exc)) from exc
    try:
        chain = Chain.open(directory, create=True)
    except OSError as exc:
        raise ChainError(f"{directory}: {exc.strerror or exc}") from exc
    chain.clean_partial()
    checkpoint = opts.checkpoint
    if checkpoint is None and "@" in export:
        checkpoint = export.rsplit("@", 1)[1] or None
    bitmap = choose_bitmap(uri, chain, opts)
    fmt, compress = _choose_format(chain, bitmap, opts)
    opts = dataclasses.replace(opts, compress=compress)
    contexts: tuple[str, ...] = (BASE_ALLOCATION,)
    if bitmap is not None:
        contexts += (DIRTY_PREFIX + bitmap,)
    started = time.time()
    t0 = time.monotonic()
    c = _open(uri, contexts, opts.timeout)
    try:
        size = c.size
        if chain.size is None:
            chain.size = size
        elif chain.size != size:
            raise BackupError(f"the source is {size} bytes but the chain in {directory} is "
                              f"of a {chain.size}-byte image")
        read, zero = _plan(c, size, bitmap)
        backing = chain.last if fmt == "qcow2" and bitmap is not None else None
        if fmt == "qcow2":
            if chain.piece % CLUSTER:
                raise BackupError(f"the chain in {directory} cuts ranges at {chain.piece} "
                                  "bytes, not a multiple of qcow2's 64 KiB clusters: use "
                                  "--format raw")
            read, zero = _cluster_plan(read, zero, CLUSTER, size)
        index, fname, rname = chain.new_names(fmt)
        cp = _write_image(c, uri, contexts, chain, chain.path(fname), size, read, zero,
                          backing, fmt, opts)
    finally:
        with contextlib.suppress(Exception):
            c.close()
    ranges: list[Range] = list(cp.results.values())
    ranges += [r for off, ln in zero for r in
               ((o, n, None) for o, n in split(off, ln, chain.piece))]
    ranges.sort()
    data = sum(n for _, n, h in ranges if h is not None)
    extra: dict[str, Any] = {}
    if fmt != "raw":
        extra = {"format": fmt, "backing": backing.file if backing else None}
        if opts.compress:
            extra["compressed"] = True
    b = Backup(index, "incremental" if bitmap is not None else "full", fname, rname, uri,
               export, checkpoint, bitmap, started, time.time(), data,
               sum(n for _, n, h in ranges if h is None), extra)
    try:
        chain.add(b, ranges)
    except OSError as exc:
        raise ChainError(f"cannot record backup {index} in {directory}: {exc}") from exc
    return BackupResult(b, len(ranges), time.monotonic() - t0)
