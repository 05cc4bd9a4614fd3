"""``--filter log``: one line per request with its outcome and duration, like nbdkit's
log filter; to a file (``file=PATH``, appended) or to the server's log.

    2026-11-29 17:14:51.123456 pid=4242 conn=3 id=17 op=write offset=0x10000 \
        length=4096 flags=fua result=ok elapsed=0.000021

(one line in the file; wrapped here).

A connection's lines share ``conn=N`` (numbered by this filter in each worker process;
``pid`` tells the worker processes apart) and open with a ``connect`` line naming the
export and close with ``disconnect``. ``elapsed`` is the time the call spent in the
layers below (seconds); a failed call says ``result=error errno=ENOSPC`` and the
error's text. Text that comes from a client or a plugin is escaped (no log injection).
With ``file=``, each line is one ``write`` to a file opened ``O_APPEND``, so the lines
of several worker processes never interleave.
"""

from __future__ import annotations

import errno as _errno
import itertools
import logging
import os
import time
from typing import Any

from pynbd.backends.base import Backend, BackendError, Extent, Param
from pynbd.filters.base import Filter
from pynbd.server.logsafe import safe

log = logging.getLogger("pynbd.filters.log")


class LogSink:
    """Where the lines go: a file descriptor opened for appending, or the logger."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1
        self.pid = os.getpid()
        self._sec = -1
        self._sec_text = ""
        if path:
            try:
                self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                                  0o644)
            except OSError as exc:
                raise BackendError(exc.errno or _errno.EIO,
                                   f"filter log: cannot open {path}: {exc.strerror}") from None
        elif log.level == logging.NOTSET:
            # asked for explicitly: shown even where the server's own chatter is not
            # (worker processes log at the level of pynbd.server, WARNING without -v)
            log.setLevel(logging.INFO)

    def stamp(self) -> str:
        t = time.time()
        sec = int(t)
        if sec != self._sec:
            self._sec = sec
            self._sec_text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sec))
        return f"{self._sec_text}.{int((t - sec) * 1e6):06d}"

    def write(self, text: str) -> None:
        if self.fd >= 0:
            try:
                os.write(self.fd, f"{self.stamp()} pid={self.pid} {text}\n".encode())
            except OSError as exc:  # a full disk must not fail the client's request
                log.warning("filter log: cannot write to %s: %s", safe(self.path),
                            exc.strerror)
        else:
            log.info("%s", text)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _flags(fua: bool = False, no_hole: bool = False, fast: bool = False) -> str:
    out = [name for name, on in (("fua", fua), ("no_hole", no_hole), ("fast_zero", fast))
           if on]
    return "|".join(out) if out else "-"


def _result(exc: BaseException | None) -> str:
    if exc is None:
        return "result=ok"
    if isinstance(exc, OSError):
        name = _errno.errorcode.get(exc.errno or 0, str(exc.errno))
        return f"result=error errno={name} message={safe(exc.strerror or exc)!r}"
    return f"result=bug exception={type(exc).__name__} message={safe(exc)!r}"


class LogFilter(Filter):
    params = {
        "file": Param("append the lines to this file (default: the server's log)", str, ""),
    }

    def __init__(self, next: Backend, *, file: str = "") -> None:
        super().__init__(next)
        self.sink = LogSink(file)
        self._numbers = itertools.count(1)
        #: per connection (each connection gets its own copy of this filter)
        self.conn = 0
        self._ids = itertools.count(1)

    # --- connections ----------------------------------------------------------------

    def open_connection(self, export: str, read_only: bool) -> Backend:
        mine = super().open_connection(export, read_only)
        if mine is self:
            import copy

            mine = copy.copy(self)
        assert isinstance(mine, LogFilter)
        mine.conn = next(self._numbers)
        mine._ids = itertools.count(1)
        mine.sink.write(f"conn={mine.conn} connect export={safe(export)!r} "
                        f"read_only={'yes' if read_only else 'no'}")
        return mine

    def close_connection(self) -> None:
        try:
            self.next.close_connection()
        finally:
            self.sink.write(f"conn={self.conn} disconnect")

    # --- requests ---------------------------------------------------------------------

    def _line(self, op: str, offset: int, length: int, flags: str, t0: float,
              exc: BaseException | None) -> None:
        elapsed = time.perf_counter() - t0
        self.sink.write(f"conn={self.conn} id={next(self._ids)} op={op} offset={offset:#x} "
                        f"length={length} flags={flags} {_result(exc)} "
                        f"elapsed={elapsed:.6f}")

    def pread_into(self, buf: memoryview, offset: int) -> None:
        t0 = time.perf_counter()
        try:
            self.next.pread_into(buf, offset)
        except BaseException as exc:
            self._line("read", offset, len(buf), "-", t0, exc)
            raise
        self._line("read", offset, len(buf), "-", t0, None)

    def pread_nowait(self, buf: memoryview, offset: int) -> bool:
        t0 = time.perf_counter()
        try:
            done = self.next.pread_nowait(buf, offset)
        except BaseException as exc:
            self._line("read", offset, len(buf), "-", t0, exc)
            raise
        if done:  # otherwise the server calls pread_into on a thread: logged there
            self._line("read", offset, len(buf), "-", t0, None)
        return done

    def pwrite(self, buf: memoryview | bytes, offset: int, fua: bool = False) -> None:
        t0 = time.perf_counter()
        try:
            self.next.pwrite(buf, offset, fua)
        except BaseException as exc:
            self._line("write", offset, len(buf), _flags(fua), t0, exc)
            raise
        self._line("write", offset, len(buf), _flags(fua), t0, None)

    def flush(self) -> None:
        t0 = time.perf_counter()
        try:
            self.next.flush()
        except BaseException as exc:
            self._line("flush", 0, 0, "-", t0, exc)
            raise
        self._line("flush", 0, 0, "-", t0, None)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        t0 = time.perf_counter()
        try:
            self.next.trim(offset, length, fua)
        except BaseException as exc:
            self._line("trim", offset, length, _flags(fua), t0, exc)
            raise
        self._line("trim", offset, length, _flags(fua), t0, None)

    def zero(self, offset: int, length: int, may_trim: bool = True, fast: bool = False,
             fua: bool = False) -> None:
        flags = _flags(fua, not may_trim, fast)
        t0 = time.perf_counter()
        try:
            self.next.zero(offset, length, may_trim, fast, fua)
        except BaseException as exc:
            self._line("zero", offset, length, flags, t0, exc)
            raise
        self._line("zero", offset, length, flags, t0, None)

    def cache(self, offset: int, length: int) -> None:
        t0 = time.perf_counter()
        try:
            self.next.cache(offset, length)
        except BaseException as exc:
            self._line("cache", offset, length, "-", t0, exc)
            raise
        self._line("cache", offset, length, "-", t0, None)

    def extents(self, offset: int, length: int) -> list[Extent]:
        t0 = time.perf_counter()
        try:
            out = self.next.extents(offset, length)
        except BaseException as exc:
            self._line("extents", offset, length, "-", t0, exc)
            raise
        self._line("extents", offset, length, "-", t0, None)
        return out

    def stats(self) -> dict[str, Any] | None:
        return None

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.sink.close()
