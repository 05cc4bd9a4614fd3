"""Ceph RBD backend: serve an RBD image (or a snapshot of one) through librbd.

librbd is called through its C API (:mod:`pynbd.backends.rbd_capi`, ctypes; Debian's
``librbd1``), not the Python bindings: READ, WRITE, FLUSH, TRIM and WRITE_ZEROES use
librbd's asynchronous calls (``aio = True``) with completions that librbd queues and
signals on an eventfd. The server's loop watches that descriptor
(:meth:`RbdBackend.aio_completion_fd`) and collects the completions with
:meth:`RbdBackend.aio_poll`, so librbd's threads never run Python or wait for the GIL,
reads land straight in the server's buffers and writes leave from them. Block status
(``rbd_diff_iterate2``) and the synchronous methods (migration, the final flush) run on
the server's worker threads; the calls release the GIL and one image handle is safe to
use from several threads.

Target syntax: ``rbd:POOL/IMAGE``, ``rbd:POOL/IMAGE@SNAP`` (read-only) and
``rbd:POOL/NAMESPACE/IMAGE[@SNAP]``. See docs/rbd.md.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from ctypes import c_char
from typing import Any, TypeVar

from pynbd.backends import rbd_capi
from pynbd.backends.base import (
    STATE_HOLE,
    STATE_ZERO,
    AioDone,
    AioReadDone,
    Backend,
    BackendError,
    Extent,
)
from pynbd.backends.rbd_capi import CephCallError, pointer_to
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
#: completions collected per rbd_poll_io_events call
_POLL_BATCH = 64

T = TypeVar("T")

_new_completion = rbd_capi.Image.completion
_release = rbd_capi.Image.release
_return_value = rbd_capi.Image.return_value


class _Request:
    """One asynchronous request in librbd's hands: what to tell ``done`` when its
    completion comes back, and the memory librbd reads from or writes into."""

    __slots__ = ("done", "fua", "keep", "length", "offset", "read_view", "what")

    def __init__(self, what: str, offset: int, length: int, fua: bool, done: Callable[..., None],
                 keep: object = None, read_view: memoryview | None = None) -> None:
        self.what = what
        self.offset = offset
        self.length = length
        self.fua = fua
        self.done = done
        self.keep = keep
        self.read_view = read_view


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
        if not rbd_capi.available():
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
        #: completion pointer -> request, for the requests in librbd's hands
        self._pending: dict[int, _Request] = {}
        self._poll_lock = threading.Lock()
        self._comps = rbd_capi.completion_array(_POLL_BATCH)
        self._handle = RbdHandle(self.target, self.conf_path, self.client_name, keyring,
                                 self.read_only)
        img = self._handle.open(connect_timeout, osd_op_timeout)
        self._image: rbd_capi.Image | None = img
        self._efd = -1
        try:
            self.size, self.object_size = img.stat()
            self.features = img.features()
            self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            img.notify_eventfd(self._efd)
        except OSError as exc:  # CephCallError, or no eventfd
            self._release()
            raise BackendError(errno_of(exc), f"{self.name}: {exc}") from None
        self.can_trim = not self.read_only
        self.can_zero = not self.read_only
        self.can_fast_zero = not self.read_only
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
    def _call(self, what: str, offset: int, length: int,
              fn: Callable[[rbd_capi.Image], T]) -> T:
        with self._lock:
            img = self._image
            if self._closed or img is None:
                raise BackendError(errno.ESHUTDOWN, f"{self.name} is closed")
            self._inflight += 1
        try:
            return fn(img)
        except CephCallError as exc:
            raise self._exc_error(what, offset, length, exc) from None
        finally:
            self._aio_end()

    def _check_writable(self, what: str) -> None:
        if self.read_only:
            kind = "a snapshot" if self.target.snapshot is not None else "read-only"
            raise BackendError(errno.EPERM, f"{self.name}: {what} refused: {kind}")

    # ---------------------------------------------------------------------- I/O
    def pread_into(self, buf: memoryview, offset: int) -> None:
        n = len(buf)
        if n == 0:
            return
        got = self._call("read", offset, n, lambda img: img.read_into(offset, n, buf))
        if got < n:  # librbd reads past the end short: the rest reads as zeros
            buf[got:] = bytes(n - got)

    def pwrite(self, buf: memoryview | bytes, offset: int, fua: bool = False) -> None:
        self._check_writable("write")
        n = len(buf)

        def run(img: rbd_capi.Image) -> None:
            written = img.write(offset, buf)
            if written != n:
                raise BackendError(errno.EIO, f"{self.name}: short write at {offset}: "
                                              f"{written} of {n} bytes")
            if fua:
                img.flush()

        self._call("write", offset, n, run)

    def flush(self) -> None:
        if self.read_only:
            return
        self._call("flush", 0, 0, lambda img: img.flush())

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._check_writable("trim")
        if length == 0:
            return

        def run(img: rbd_capi.Image) -> None:
            img.discard(offset, length)
            if fua:
                img.flush()

        self._call("trim", offset, length, run)

    def zero(self, offset: int, length: int, may_trim: bool = True, fast: bool = False,
             fua: bool = False) -> None:
        self._check_writable("write zeroes")
        if fast and not may_trim:
            # NO_HOLE needs zeros written on the OSDs: no faster than a write
            raise BackendError(errno.ENOTSUP, f"{self.name}: fast zero not supported here")
        if length == 0:
            return
        flags = 0 if may_trim else rbd_capi.RBD_WRITE_ZEROES_FLAG_THICK_PROVISION

        def run(img: rbd_capi.Image) -> None:
            img.write_zeroes(offset, length, flags)
            if fua:
                img.flush()

        self._call("write zeroes", offset, length, run)

    def cache(self, offset: int, length: int) -> None:
        """Advisory; librbd's default cache does not keep reads, so prefetching buys nothing."""

    def extents(self, offset: int, length: int) -> list[Extent]:
        if length <= 0:
            return [Extent(max(length, 1), 0)]
        end = min(offset + length, self.size)
        if offset >= end:
            return [Extent(length, 0)]
        fast = bool(self.features & rbd_capi.RBD_FEATURE_FAST_DIFF)
        if fast:
            try:
                flags = self._call("block status", offset, length, lambda img: img.flags())
                fast = not flags & rbd_capi.RBD_FLAG_FAST_DIFF_INVALID
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
        self._call("block status", offset, span,
                   lambda img: img.diff_iterate(offset, span, fast, found))
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
    # once. ``done`` is called exactly once: from aio_poll() when librbd has finished (the
    # server calls it on its loop when aio_completion_fd() is readable), or right away,
    # on the calling thread, when the request is refused before it reaches librbd.

    def aio_completion_fd(self) -> int | None:
        return self._efd if self._efd >= 0 else None

    def aio_poll(self) -> None:
        """Deliver every completion librbd has queued (each request's ``done``)."""
        with self._poll_lock:
            try:
                os.eventfd_read(self._efd)
            except OSError:  # nothing signalled (EAGAIN), or closed
                pass
            img = self._image
            if img is None:
                return
            comps = self._comps
            pending = self._pending
            while True:
                n = img.poll(comps)
                for i in range(n):
                    comp = comps[i]
                    req = pending.pop(comp, None)
                    rv = _return_value(comp)
                    _release(comp)
                    if req is not None:  # always, unless librbd repeats itself
                        self._complete(req, rv)
                if n < _POLL_BATCH:
                    return

    def _complete(self, req: _Request, rv: int) -> None:
        err: OSError | None = None
        try:
            if rv < 0:
                err = self._rv_error(req.what, req.offset, req.length, rv)
            elif req.read_view is not None:
                n = req.length
                if rv < n:  # the image shrank under the export: past its end is zeros
                    req.read_view[rv:] = bytes(n - rv)
            elif req.fua:  # librbd has no FUA write: the request ends with a flush
                req.what += " (FUA flush)"
                req.fua = False
                req.keep = None
                err = self._start(req, _flush)
                if err is None:
                    return  # still in flight
        except Exception as exc:
            err = self._exc_error(req.what, req.offset, req.length, exc)
        req.keep = req.read_view = None  # librbd is done with the memory: let it go
        self._aio_end()
        _finish(req.done, err)

    def _aio_begin(self, done: AioDone) -> rbd_capi.Image | None:
        """Count a request in: the image to use, or None (``done`` already told) when
        the backend is closed."""
        with self._lock:
            img = self._image
            if not self._closed and img is not None:
                self._inflight += 1
                return img
        _finish(done, BackendError(errno.ESHUTDOWN, f"{self.name} is closed"))
        return None

    def _aio_end(self) -> None:
        with self._lock:
            self._inflight -= 1
            if self._inflight == 0:
                self._lock.notify_all()

    def _start(self, req: _Request,
               submit: Callable[[rbd_capi.Image, int], None]) -> OSError | None:
        """Hand ``req`` to librbd: None, or the error when librbd refused it at once (no
        completion will come then)."""
        img = self._image
        comp = 0
        try:
            if img is None:
                raise BackendError(errno.ESHUTDOWN, f"{self.name} is closed")
            comp = _new_completion()
            self._pending[comp] = req
            submit(img, comp)
        except Exception as exc:
            if comp:
                self._pending.pop(comp, None)
                _release(comp)
            return self._exc_error(req.what, req.offset, req.length, exc)
        return None

    def _submit(self, req: _Request, submit: Callable[[rbd_capi.Image, int], None]) -> None:
        err = self._start(req, submit)
        if err is not None:
            req.keep = req.read_view = None
            self._aio_end()
            _finish(req.done, err)

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
        """An exception from a librbd call (raised at submission, or synchronously)."""
        if isinstance(exc, BackendError):
            return exc
        if isinstance(exc, CephCallError):
            return self._rv_error(what, offset, length, -errno_of(exc))
        return self._aio_error(what, offset, length, errno_of(exc), str(exc) or repr(exc))

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
        # librbd reads straight into the server's buffer (kept exported until done)
        arr = (c_char * n).from_buffer(buf)
        if self._aio_begin(done) is None:
            return
        req = _Request("read", offset, n, False, done, arr, buf)
        self._submit(req, lambda img, c: img.aio_read(offset, n, arr, c))

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
        keep, ptr = pointer_to(buf)  # the server's buffer itself, held until librbd is done
        if self._aio_begin(done) is None:
            return
        req = _Request("write", offset, n, fua, done, keep)
        self._submit(req, lambda img, c: img.aio_write(offset, n, ptr, c))

    def aio_flush(self, done: AioDone) -> None:
        if self.read_only:
            _finish(done, None)
            return
        if self._aio_begin(done) is None:
            return
        self._submit(_Request("flush", 0, 0, False, done), _flush)

    def _aio_begin_range(self, length: int, fua: bool, done: AioDone) -> bool:
        """True when a trim or zero of ``length`` bytes is counted in and should start;
        False when it is already taken care of (nothing to change: a flush if FUA asked,
        else done) or refused."""
        if length == 0:
            if fua:
                self.aio_flush(done)
            else:
                _finish(done, None)
            return False
        return self._aio_begin(done) is not None

    def aio_trim(self, offset: int, length: int, fua: bool, done: AioDone) -> None:
        if self._refuse_write("trim", done) or not self._aio_begin_range(length, fua, done):
            return
        self._submit(_Request("trim", offset, length, fua, done),
                     lambda img, c: img.aio_discard(offset, length, c))

    def aio_zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool,
                 done: AioDone) -> None:
        if self._refuse_write("write zeroes", done):
            return
        if fast and not may_trim:
            # NO_HOLE needs zeros written on the OSDs: no faster than a write
            _finish(done, BackendError(errno.ENOTSUP,
                                       f"{self.name}: fast zero not supported here"))
            return
        if not self._aio_begin_range(length, fua, done):
            return
        flags = 0 if may_trim else rbd_capi.RBD_WRITE_ZEROES_FLAG_THICK_PROVISION
        self._submit(_Request("write zeroes", offset, length, fua, done),
                     lambda img, c: img.aio_write_zeroes(offset, length, flags, c))

    # -------------------------------------------------------------------- close
    def close(self, timeout: float = 30.0) -> None:
        """Wait (bounded) for the calls and aio requests in flight, collecting their
        completions here, flush, close the image and disconnect. New requests are refused
        with ESHUTDOWN from the start. Every aio request still gets its ``done``: those
        that outlast the wait are answered after librbd's close (which waits for them)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        deadline = time.monotonic() + timeout
        poller = select.poll()
        if self._efd >= 0:
            poller.register(self._efd, select.POLLIN)
        while True:
            with self._lock:
                left = self._inflight
            remaining = deadline - time.monotonic()
            if not left or remaining <= 0:
                break
            if self._pending:
                poller.poll(min(200, max(1, int(remaining * 1000))))
                self.aio_poll()
            else:  # synchronous calls on other threads
                with self._lock:
                    if self._inflight:
                        self._lock.wait(min(0.2, remaining))
        if left:
            # librbd's close waits for its requests in flight (each ends by
            # rados_osd_op_timeout at the latest); they are answered after it
            log.warning("%s: closing with %d request(s) still in flight after %.0f s",
                        self.name, left, timeout)
        img = self._image
        if img is not None and not self.read_only:
            try:
                img.flush()
            except Exception as exc:
                log.warning("%s: flush at close failed: %s", self.name, exc)
        self._release()

    def _release(self) -> None:
        with self._poll_lock:  # no aio_poll after this: it sees no image
            img, self._image = self._image, None
        if img is not None:
            self._handle.image = None
            try:
                img.close()  # waits for what librbd still has in flight
            except Exception as exc:
                log.warning("%s: closing the image failed: %s", self.name, exc)
        # answer what was still in flight (librbd finished it while closing, or never will)
        pending, self._pending = self._pending, {}
        for comp, req in pending.items():
            rv = _return_value(comp) if img is not None else -errno.ESHUTDOWN
            _release(comp)
            req.fua = False  # no flush to chain now
            self._complete(req, rv)
        self._handle.release()
        with self._poll_lock:
            if self._efd >= 0:
                os.close(self._efd)
                self._efd = -1


def _flush(img: rbd_capi.Image, comp: int) -> None:
    img.aio_flush(comp)


def _finish(done: Callable[..., None], err: OSError | None) -> None:
    try:
        done(err)
    except Exception:  # a bug in the caller's handler: never let it stop the others
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
