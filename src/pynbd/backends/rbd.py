"""Ceph RBD backend: serve an RBD image (or a snapshot of one) through librbd.

Uses the official Python bindings of librados/librbd (Debian's ``python3-rados`` and
``python3-rbd``, built for the distribution's ``/usr/bin/python3``).

READ, WRITE, FLUSH, TRIM and WRITE_ZEROES use librbd's asynchronous API
(``aio = True``): the server's event loop starts each request with ``aio_read`` /
``aio_write`` / ``aio_flush`` / ``aio_discard`` / ``aio_write_zeroes`` and librbd calls
back from its own thread when it is done, so the number of requests in flight is
bounded by the clients' queue depth and the server's ``max_inflight``, not by a thread
pool, and no thread is parked per request. Block status (``diff_iterate``) and the
synchronous methods (used by migration and by the final flush) run on the server's
worker threads: the bindings release the GIL during each librbd call and one
``rbd.Image`` handle is safe to use from several threads.

Target syntax: ``rbd:POOL/IMAGE``, ``rbd:POOL/IMAGE@SNAP`` (read-only) and
``rbd:POOL/NAMESPACE/IMAGE[@SNAP]``. See docs/rbd.md.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pynbd.backends.base import (
    STATE_HOLE,
    STATE_ZERO,
    AioDone,
    AioReadDone,
    Backend,
    BackendError,
    Extent,
)
from pynbd.backends.rbd_cluster import (
    DEFAULT_CLIENT,
    DEFAULT_CONF,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_OSD_OP_TIMEOUT,
    IMPORT_ERROR,
    INSTALL_HINT,
    RbdHandle,
    RbdTarget,
    errno_of,
    full_client_name,
    parse_rbd_target,
    rados,
    rbd,
)

__all__ = [
    "DEFAULT_CLIENT",
    "DEFAULT_CONF",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_OSD_OP_TIMEOUT",
    "INSTALL_HINT",
    "RbdBackend",
    "RbdTarget",
    "parse_rbd_target",
]

log = logging.getLogger("pynbd.backends.rbd")

#: block status without fast-diff costs one RADOS op per object: answer at most this many
_SLOW_EXTENT_OBJECTS = 16
#: block status with fast-diff (object map in memory): answer at most this much per call
_FAST_EXTENT_BYTES = 1 << 30

T = TypeVar("T")



class RbdBackend(Backend):
    """An RBD image (read-write) or a snapshot (read-only) served through librbd."""

    blocking = True
    #: READ/WRITE/FLUSH/TRIM/WRITE_ZEROES through librbd's aio API (see the aio_* methods)
    aio = True
    rotational = False
    can_extents = True
    can_cache = True
    block_size = (1, 4096, 32 * 1024 * 1024)

    def __init__(self, pool: str, image: str, snapshot: str | None = None,
                 conf: str | None = None, client_name: str | None = None,
                 keyring: str | None = None, read_only: bool = False, *,
                 namespace: str = "", connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 osd_op_timeout: float = DEFAULT_OSD_OP_TIMEOUT) -> None:
        if rados is None or rbd is None:
            raise BackendError(errno.ENOSYS, f"rbd:{pool}/{image}: {INSTALL_HINT} "
                                             f"({IMPORT_ERROR})")
        self.target = RbdTarget(pool, image, snapshot, namespace)
        self.name = f"rbd:{self.target.spec}"
        self.conf_path = conf or os.environ.get("CEPH_CONF") or DEFAULT_CONF
        self.client_name = full_client_name(client_name)
        self.keyring = keyring
        self.read_only = read_only or snapshot is not None
        self._lock = threading.Condition(threading.Lock())
        self._inflight = 0
        self._closed = False
        self._handle = RbdHandle(self.target, self.conf_path, self.client_name, keyring,
                                 self.read_only)
        self._image: Any = self._handle.open(connect_timeout, osd_op_timeout)
        img: Any = self._image
        self.size = int(img.size())
        st = img.stat()
        self.object_size = int(st["obj_size"])
        self.features = int(img.features())
        self._has_write_zeroes = hasattr(img, "write_zeroes")
        if not hasattr(img, "aio_write_zeroes"):
            self.aio = False  # older bindings: every call runs on the server's threads
        self.can_trim = not self.read_only
        self.can_zero = not self.read_only
        self.can_fast_zero = not self.read_only and self._has_write_zeroes
        self.can_flush = True
        self.can_fua = True
        self.can_multi_conn = self._handle.multi_conn_safe()
        log.info("opened %s (%d bytes, %d-byte objects, features 0x%x, %s, multi-conn %s)",
                 self.name, self.size, self.object_size, self.features,
                 "read-only" if self.read_only else "read-write", self.can_multi_conn)

    @classmethod
    def from_target(cls, target: str, conf: str | None = None, name: str | None = None,
                    keyring: str | None = None, read_only: bool = False,
                    **kwargs: Any) -> RbdBackend:
        """Open ``rbd:POOL/IMAGE[@SNAP]``; ``name`` is the Ceph client name."""
        try:
            t = parse_rbd_target(target)
        except ValueError as exc:
            raise BackendError(errno.EINVAL, str(exc)) from None
        return cls(t.pool, t.image, t.snapshot, conf=conf, client_name=name, keyring=keyring,
                   read_only=read_only, namespace=t.namespace, **kwargs)

    # --------------------------------------------------------------- plumbing
    def _call(self, what: str, offset: int, length: int, fn: Callable[[], T]) -> T:
        with self._lock:
            if self._closed:
                raise BackendError(errno.ESHUTDOWN, f"{self.name} is closed")
            self._inflight += 1
        try:
            return fn()
        except (rbd.Error, rados.Error) as exc:
            err = errno_of(exc)
            if err == errno.EROFS or (err == errno.EPERM and self.read_only):
                err = errno.EPERM
            raise BackendError(err, f"{self.name}: {what} at {offset}+{length} failed: "
                                    f"{exc}") from None
        finally:
            with self._lock:
                self._inflight -= 1
                if self._inflight == 0:
                    self._lock.notify_all()

    def _check_writable(self, what: str) -> None:
        if self.read_only:
            kind = "a snapshot" if self.target.snapshot is not None else "read-only"
            raise BackendError(errno.EPERM, f"{self.name}: {what} refused: {kind}")

    # ---------------------------------------------------------------------- I/O
    def pread_into(self, buf: memoryview, offset: int) -> None:
        n = len(buf)
        if n == 0:
            return
        img = self._image
        data = self._call("read", offset, n, lambda: img.read(offset, n))
        got = len(data)
        buf[:got] = data
        if got < n:  # librbd reads past the end short: the rest reads as zeros
            buf[got:] = bytes(n - got)

    def pwrite(self, buf: memoryview | bytes, offset: int, fua: bool = False) -> None:
        self._check_writable("write")
        data = buf if isinstance(buf, bytes) else bytes(buf)  # the binding wants bytes
        img = self._image

        def run() -> None:
            written = img.write(data, offset)
            if written != len(data):
                raise BackendError(errno.EIO, f"{self.name}: short write at {offset}: "
                                              f"{written} of {len(data)} bytes")
            if fua:
                img.flush()

        self._call("write", offset, len(data), run)

    def flush(self) -> None:
        if self.read_only:
            return
        img = self._image
        self._call("flush", 0, 0, img.flush)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._check_writable("trim")
        if length == 0:
            return
        img = self._image

        def run() -> None:
            img.discard(offset, length)
            if fua:
                img.flush()

        self._call("trim", offset, length, run)

    def zero(self, offset: int, length: int, may_trim: bool = True, fast: bool = False,
             fua: bool = False) -> None:
        self._check_writable("write zeroes")
        if fast and (not may_trim or not self._has_write_zeroes):
            # NO_HOLE needs zeros written on the OSDs: no faster than a write
            raise BackendError(errno.ENOTSUP, f"{self.name}: fast zero not supported here")
        if length == 0:
            return
        img = self._image
        if self._has_write_zeroes:
            flags = 0 if may_trim else getattr(rbd, "RBD_WRITE_ZEROES_FLAG_THICK_PROVISION", 1)

            def run() -> None:
                img.write_zeroes(offset, length, flags)
                if fua:
                    img.flush()

            self._call("write zeroes", offset, length, run)
            return
        # old bindings: discard what may be discarded, then write zeros for certain
        if may_trim:
            self._call("discard", offset, length, lambda: img.discard(offset, length))
        super().zero(offset, length, may_trim=may_trim, fast=False, fua=fua)

    def cache(self, offset: int, length: int) -> None:
        """Advisory; librbd's default cache does not keep reads, so prefetching buys nothing."""

    def extents(self, offset: int, length: int) -> list[Extent]:
        if length <= 0:
            return [Extent(max(length, 1), 0)]
        end = min(offset + length, self.size)
        if offset >= end:
            return [Extent(length, 0)]
        img = self._image
        fast = bool(self.features & rbd.RBD_FEATURE_FAST_DIFF)
        if fast:
            try:
                fast = not (int(img.flags()) & rbd.RBD_FLAG_FAST_DIFF_INVALID)
            except Exception:
                fast = False
        # bound the work of one call: without fast-diff each object costs a RADOS op
        limit = _FAST_EXTENT_BYTES if fast else _SLOW_EXTENT_OBJECTS * self.object_size
        if end - offset > limit:
            end = offset + limit
            aligned = end - end % self.object_size
            if aligned > offset:
                end = aligned
        span = end - offset
        found: list[tuple[int, int]] = []

        def cb(off: int, n: int, exists: bool) -> int:
            if exists:
                found.append((off, n))
            return 0

        self._call("block status", offset, span,
                   lambda: img.diff_iterate(offset, span, None, cb, include_parent=True,
                                            whole_object=fast))
        found.sort()
        out: list[Extent] = []
        pos = offset
        for off, n in found:
            start, stop = max(off, pos), min(off + n, end)
            if stop <= start:
                continue
            if start > pos:
                out.append(Extent(start - pos, STATE_HOLE | STATE_ZERO))
            out.append(Extent(stop - start, 0))
            pos = stop
        if pos < end:
            out.append(Extent(end - pos, STATE_HOLE | STATE_ZERO))
        return _merge(out)

    # ------------------------------------------------------------- asynchronous I/O
    # The server's event loop calls these: each starts the librbd request and returns at
    # once; ``done`` is called exactly once, from librbd's completion thread (or right
    # here when the request is refused before it reaches librbd). The bindings swallow
    # exceptions raised in a completion callback, so every callback catches everything
    # and always ends in ``done``.

    def _aio_begin(self, done: AioDone) -> Any:
        """Count a request in: the image to use, or None (``done`` already told) when
        the backend is closed."""
        with self._lock:
            if not self._closed:
                self._inflight += 1
                return self._image
        _finish(done, BackendError(errno.ESHUTDOWN, f"{self.name} is closed"))
        return None

    def _aio_end(self) -> None:
        with self._lock:
            self._inflight -= 1
            if self._inflight == 0:
                self._lock.notify_all()

    def _aio_error(self, what: str, offset: int, length: int, err: int,
                   detail: str) -> BackendError:
        if err == errno.EROFS or (err == errno.EPERM and self.read_only):
            err = errno.EPERM
        return BackendError(err, f"{self.name}: {what} at {offset}+{length} failed: {detail}")

    def _rv_error(self, what: str, offset: int, length: int, rv: int) -> BackendError:
        """A librbd completion's negative return value as an error."""
        err = -rv if rv < 0 else errno.EIO
        if err == errno.ETIMEDOUT:
            detail = "timed out (are the OSDs up?)"
        elif err == errno.ESHUTDOWN:
            detail = "this client was blocklisted or the image shut down"
        else:
            detail = os.strerror(err)
        return self._aio_error(what, offset, length, err, f"[errno {err}] {detail}")

    def _exc_error(self, what: str, offset: int, length: int,
                   exc: BaseException) -> BackendError:
        """An exception from the bindings (raised at submission, or in a callback)."""
        if isinstance(exc, BackendError):
            return exc
        return self._aio_error(what, offset, length, errno_of(exc), str(exc) or repr(exc))

    def _aio_callback(self, img: Any, what: str, offset: int, length: int, fua: bool,
                      done: AioDone, keep: object = None) -> Callable[[Any], None]:
        """The completion callback of a write-like request; with ``fua`` it chains an
        ``aio_flush`` (librbd has no FUA write) and the request ends with the flush.
        ``keep`` holds the written bytes until librbd is done with them (the bindings
        keep only a pointer)."""

        def complete(comp: Any) -> None:
            _pin_thread_state()
            nonlocal keep
            keep = None
            try:
                rv = comp.get_return_value()
                if rv < 0:
                    err: OSError | None = self._rv_error(what, offset, length, rv)
                elif fua:
                    img.aio_flush(self._aio_callback(img, f"{what} (FUA flush)", offset,
                                                     length, False, done))
                    return  # still in flight: the flush's callback ends it
                else:
                    err = None
            except Exception as exc:
                err = self._exc_error(what, offset, length, exc)
            self._aio_end()
            _finish(done, err)

        return complete

    def _aio_submit(self, img: Any, what: str, offset: int, length: int,
                    start: Callable[[], Any], done: AioDone) -> None:
        try:
            start()
        except Exception as exc:  # refused before it was queued: no callback will come
            self._aio_end()
            _finish(done, self._exc_error(what, offset, length, exc))

    def _refuse_write(self, what: str, done: AioDone) -> bool:
        if not self.read_only:
            return False
        kind = "a snapshot" if self.target.snapshot is not None else "read-only"
        _finish(done, BackendError(errno.EPERM, f"{self.name}: {what} refused: {kind}"))
        return True

    def aio_pread(self, buf: memoryview, offset: int, done: AioReadDone) -> None:
        n = len(buf)
        if n == 0:
            _finish(done, None)
            return
        img = self._aio_begin(done)
        if img is None:
            return

        def complete(comp: Any, data: bytes | None) -> None:
            _pin_thread_state()
            err: OSError | None = None
            whole: bytes | None = None
            # The bindings pass None on an error and otherwise the bytes read, cut to the
            # length librbd returned. librbd returns at least one byte for a non-empty read
            # (a read starting at or past the end fails with EINVAL), so ``len(data)`` is the
            # count and no second get_return_value() (a GIL release and reacquire) is needed.
            try:
                if data is None:
                    err = self._rv_error("read", offset, n, comp.get_return_value())
                elif len(data) == n:
                    whole = data  # the server sends the bindings' own buffer: no copy
                else:  # short: the image shrank under the export; past its end is zeros
                    got = min(len(data), n)
                    buf[:got] = data[:got]
                    buf[got:] = bytes(n - got)
            except Exception as exc:
                err = self._exc_error("read", offset, n, exc)
            self._aio_end()
            _finish(done, err, whole)

        self._aio_submit(img, "read", offset, n, lambda: img.aio_read(offset, n, complete),
                         done)

    def aio_pwrite(self, buf: memoryview, offset: int, fua: bool, done: AioDone) -> None:
        if self._refuse_write("write", done):
            return
        n = len(buf)
        if n == 0:
            if fua:
                self.aio_flush(done)
            else:
                _finish(done, None)
            return
        img = self._aio_begin(done)
        if img is None:
            return
        # the bindings take bytes or a bytearray (not a memoryview): hand over the
        # server's own bytearray when the view is all of it, else copy once
        obj = getattr(buf, "obj", None)
        if type(obj) is bytearray and len(obj) == n and buf.contiguous:
            data: bytes | bytearray = obj
        else:
            data = bytes(buf)
        cb = self._aio_callback(img, "write", offset, n, fua, done, keep=data)
        self._aio_submit(img, "write", offset, n, lambda: img.aio_write(data, offset, cb), done)

    def aio_flush(self, done: AioDone) -> None:
        if self.read_only:
            _finish(done, None)
            return
        img = self._aio_begin(done)
        if img is None:
            return
        cb = self._aio_callback(img, "flush", 0, 0, False, done)
        self._aio_submit(img, "flush", 0, 0, lambda: img.aio_flush(cb), done)

    def _aio_begin_range(self, length: int, fua: bool, done: AioDone) -> Any:
        """The image for a trim or zero of ``length`` bytes, or None when the request is
        already taken care of (nothing to change: a flush if FUA asked, else done)."""
        if length == 0:
            if fua:
                self.aio_flush(done)
            else:
                _finish(done, None)
            return None
        return self._aio_begin(done)

    def aio_trim(self, offset: int, length: int, fua: bool, done: AioDone) -> None:
        if self._refuse_write("trim", done):
            return
        img = self._aio_begin_range(length, fua, done)
        if img is None:
            return
        cb = self._aio_callback(img, "trim", offset, length, fua, done)
        self._aio_submit(img, "trim", offset, length,
                         lambda: img.aio_discard(offset, length, cb), done)

    def aio_zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool,
                 done: AioDone) -> None:
        if self._refuse_write("write zeroes", done):
            return
        if fast and not may_trim:
            # NO_HOLE needs zeros written on the OSDs: no faster than a write
            _finish(done, BackendError(errno.ENOTSUP,
                                       f"{self.name}: fast zero not supported here"))
            return
        img = self._aio_begin_range(length, fua, done)
        if img is None:
            return
        flags = 0 if may_trim else getattr(rbd, "RBD_WRITE_ZEROES_FLAG_THICK_PROVISION", 1)
        cb = self._aio_callback(img, "write zeroes", offset, length, fua, done)
        self._aio_submit(img, "write zeroes", offset, length,
                         lambda: img.aio_write_zeroes(offset, length, cb, zero_flags=flags),
                         done)

    # -------------------------------------------------------------------- close
    def close(self, timeout: float = 30.0) -> None:
        """Wait (bounded) for the calls and aio requests in flight, flush, close the image
        and disconnect. New requests are refused with ESHUTDOWN from the start."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            deadline = time.monotonic() + timeout
            while self._inflight and time.monotonic() < deadline:
                self._lock.wait(deadline - time.monotonic())
            left = self._inflight
        if left:
            # librbd's close waits for its requests in flight (each ends by
            # rados_osd_op_timeout at the latest); their completions still answer
            log.warning("%s: closing with %d request(s) still in flight after %.0f s",
                        self.name, left, timeout)
        if self._image is not None and not self.read_only:
            try:
                self._image.flush()
            except Exception as exc:
                log.warning("%s: flush at close failed: %s", self.name, exc)
        self._release()

    def _release(self) -> None:
        self._image = None
        self._handle.release()

class _CallbackThread(threading.local):
    pinned = False


_callback_thread = _CallbackThread()


def _pin_thread_state() -> None:
    """Keep a Python thread state on the librbd thread running this completion.

    The bindings enter Python from librbd's threads with ``PyGILState_Ensure`` and
    leave with ``PyGILState_Release``; on a thread Python did not start, that creates
    and destroys a thread state (and mmaps and munmaps its 16 KiB frame stack, each
    munmap a TLB shootdown on every CPU) for every completion: measured 60-100 us of
    CPU per 4 KiB read. One extra ``PyGILState_Ensure`` per thread, never released,
    keeps the state for the thread's life (librbd's few threads live as long as the
    cluster connection).
    """
    tl = _callback_thread
    if not tl.pinned:
        tl.pinned = True
        ctypes.pythonapi.PyGILState_Ensure()


def _finish(done: Callable[..., None], err: OSError | None, data: bytes | None = None) -> None:
    try:
        if data is None:
            done(err)
        else:
            done(None, data)
    except Exception:  # on librbd's thread nobody else would see it
        log.exception("aio completion handler failed")


def _merge(extents: list[Extent]) -> list[Extent]:
    out: list[Extent] = []
    for e in extents:
        if e.length <= 0:
            continue
        if out and out[-1].flags == e.flags:
            out[-1] = Extent(out[-1].length + e.length, e.flags)
        else:
            out.append(e)
    return out
