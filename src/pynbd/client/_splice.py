"""Moving payload bytes between file descriptors without passing them through Python.

Used by :meth:`pynbd.client.blocking.Client.submit_write_from`: the payload of a WRITE
comes from another descriptor (the socket of a source connection, or a file), and is
moved into the connection's socket by the kernel:

- socket (or pipe) -> socket: ``splice(2)`` through a pipe owned by the mover. On Linux
  >= 6.5 both halves are zero-copy for Unix and TCP sockets (the pages of the source's
  socket buffers are handed on), so the client never touches the data.
- regular file -> socket: ``sendfile(2)`` (page cache -> socket).

Where the kernel refuses (another OS, unusual descriptor types) the mover falls back to
reading into a buffer and sending it, once and for all.

Descriptors may be blocking or non-blocking (a socket with a timeout is non-blocking
underneath); on EAGAIN the mover polls, bounded by the timeout it was given.
"""

from __future__ import annotations

import errno
import os
import select
from collections.abc import Callable

from pynbd.protocol.errors import PeerProtocolError

#: pipe capacity asked for (the unprivileged maximum by default, /proc/sys/fs/pipe-max-size)
PIPE_SIZE = 1 << 20
_COPY_SIZE = 256 * 1024
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Linux), constant for older Pythons
#: errors meaning "this kernel/descriptor pair cannot do it": fall back to copying
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ESPIPE, errno.EBADF,
                errno.ENOTSOCK}
HAVE_SPLICE = hasattr(os, "splice")


def _wait(fd: int, events: int, timeout: float | None) -> None:
    p = select.poll()
    p.register(fd, events)
    if not p.poll(None if timeout is None else max(0, int(timeout * 1000))):
        raise TimeoutError("timed out")


class Mover:
    """Moves byte ranges from a descriptor into one destination socket."""

    def __init__(self) -> None:
        self._pipe: tuple[int, int] | None = None
        self._cap = 0
        #: splice(2) works for the descriptors seen so far
        self.splice_ok = HAVE_SPLICE
        self.sendfile_ok = hasattr(os, "sendfile")
        self._buf: memoryview | None = None
        #: bytes moved by the kernel (splice/sendfile) and through the buffer
        self.spliced = 0
        self.copied = 0

    def close(self) -> None:
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None

    def _get_pipe(self) -> tuple[int, int]:
        if self._pipe is None:
            r, w = os.pipe2(os.O_CLOEXEC)
            try:
                import fcntl
                self._cap = fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                self._cap = 65536  # the default; still far better than copying
            self._pipe = (r, w)
        return self._pipe

    def _scratch(self) -> memoryview:
        if self._buf is None:
            self._buf = memoryview(bytearray(_COPY_SIZE))
        return self._buf

    # --- socket/pipe -> socket ---------------------------------------------------------

    def stream(self, src: int, dst: int, n: int, timeout: float | None,
               send: Callable[[memoryview], None]) -> None:
        """Move exactly ``n`` bytes from ``src`` (a socket or pipe) to the socket ``dst``.
        ``send`` sends bytes on ``dst`` the ordinary way (used for the fallback)."""
        if self.splice_ok:
            n = self._splice(src, dst, n, timeout, send)
        if n:
            self._copy(src, None, n, timeout, send)

    def _splice(self, src: int, dst: int, n: int, timeout: float | None,
                send: Callable[[memoryview], None]) -> int:
        """Returns the bytes left to move when splice turned out not to work."""
        r, w = self._get_pipe()
        cap = self._cap
        splice = os.splice
        more = os.SPLICE_F_MORE
        left = n
        while left:
            try:
                k = splice(src, w, min(left, cap))
            except BlockingIOError:
                _wait(src, select.POLLIN, timeout)
                continue
            except OSError as exc:
                if exc.errno in _UNSUPPORTED and left == n and self.spliced == 0:
                    self.splice_ok = False
                    return left
                raise
            if not k:
                raise PeerProtocolError("source closed the connection mid-payload")
            left -= k
            while k:
                try:
                    moved = splice(r, dst, k, flags=more if left else 0)
                    k -= moved
                    self.spliced += moved
                except BlockingIOError:
                    _wait(dst, select.POLLOUT, timeout)
                except OSError as exc:
                    if exc.errno not in _UNSUPPORTED or self.spliced:
                        raise
                    # the destination refuses splice: empty the pipe by hand
                    self.splice_ok = False
                    buf = self._scratch()
                    while k:
                        got = os.readv(r, [buf[:min(k, len(buf))]])
                        send(buf[:got])
                        k -= got
                    return left
        return 0

    # --- file -> socket ----------------------------------------------------------------

    def file(self, src: int, offset: int, dst: int, n: int, timeout: float | None,
             send: Callable[[memoryview], None]) -> None:
        """Move ``n`` bytes of the regular file ``src`` at ``offset`` to socket ``dst``."""
        while n and self.sendfile_ok:
            try:
                k = os.sendfile(dst, src, offset, n)
            except BlockingIOError:
                _wait(dst, select.POLLOUT, timeout)
                continue
            except OSError as exc:
                if exc.errno in _UNSUPPORTED and self.spliced == 0:
                    self.sendfile_ok = False
                    break
                raise
            if not k:
                raise OSError(errno.EIO, f"short read at offset {offset} (end of file?)")
            self.spliced += k
            offset += k
            n -= k
        if n:
            self._copy(src, offset, n, timeout, send)

    # --- fallback ----------------------------------------------------------------------

    def _copy(self, src: int, offset: int | None, n: int, timeout: float | None,
              send: Callable[[memoryview], None]) -> None:
        buf = self._scratch()
        while n:
            part = buf[:min(n, len(buf))]
            try:
                if offset is None:
                    k = os.readv(src, [part])
                else:
                    k = os.preadv(src, [part], offset)
                    offset += k
            except BlockingIOError:
                _wait(src, select.POLLIN, timeout)
                continue
            if not k:
                if offset is None:
                    raise PeerProtocolError("source closed the connection mid-payload")
                raise OSError(errno.EIO, f"short read at offset {offset} (end of file?)")
            send(part[:k])
            self.copied += k
            n -= k
