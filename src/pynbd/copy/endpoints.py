"""The two sides of a copy -- NBD exports, files (or block devices) and streams -- behind
one interface, like nbdcopy's table of operations.

An :class:`Endpoint` is opened once per side and knows its size and limits;
:meth:`Endpoint.open_handles` gives each worker its own :class:`Handle` (an NBD
connection, or the file's shared descriptor), through which it maps extents, reads,
writes, zeroes and forwards. ``submit_*`` calls may finish later: they return a
:data:`Token` that :meth:`Handle.wait` completes (``None``: already done).
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import sys
from collections.abc import Iterator
from typing import Protocol, TypeAlias, cast

from pynbd.client import Client, CmdFlag, Request, connect, parse_uri
from pynbd.client.uri import is_uri
from pynbd.copy.errors import CopyError
from pynbd.protocol.constants import BASE_ALLOCATION, DEFAULT_MAX_REQUEST

#: a pending request (completed by :meth:`Handle.wait`) or None for work already done
Token: TypeAlias = Request | None
#: one extent: (offset, length, reads as zeroes)
Extent: TypeAlias = tuple[int, int, bool]

#: zeroes to write or hash from (a stream, a file without holes, an NBD server that
#: cannot WRITE_ZEROES)
ZEROES = bytes(4 << 20)
#: SO_SNDBUF asked for on Unix-socket destinations when forwarding
#: (see :meth:`NBDHandle.prepare_forward`)
SEND_BUFFER = 2 << 20
_NO_HEAD = memoryview(b"")


class ForwardSink(Protocol):
    """Where a forwarding source delivers its data: ``data`` for a chunk whose bytes wait
    on ``fd`` (a socket after ``head``, or a file at ``fd_offset``), ``hole`` for a
    chunk that reads as zeroes (a :class:`pynbd.client.ReadSink` that also takes files)."""

    def data(self, offset: int, length: int, head: memoryview, fd: int,
             fd_offset: int | None = None) -> None: ...

    def hole(self, offset: int, length: int) -> None: ...


class Handle:
    """One worker's access to an endpoint, used by one thread at a time. The defaults
    refuse what an endpoint cannot do (the engine does not ask)."""

    #: the kernel can move this source's data (:meth:`submit_forward`)
    forward_source = False
    #: ... into this destination (:meth:`submit_write_from`)
    forward_destination = False

    def __init__(self, name: str) -> None:
        self.name = name

    def _cannot(self, what: str) -> CopyError:
        return CopyError(f"{self.name}: cannot {what}")

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        """Extents covering the range, in order (all data unless the endpoint knows)."""
        yield offset, length, False

    def submit_read(self, offset: int, view: memoryview) -> Token:
        """Read ``len(view)`` bytes at ``offset`` into ``view``."""
        raise self._cannot("read at an offset")

    def read_next(self, view: memoryview) -> int:
        """(a stream) Fill ``view`` with the next bytes; fewer only at the end."""
        raise self._cannot("read sequentially")

    def submit_write(self, offset: int, view: memoryview) -> Token:
        raise self._cannot("write")

    def submit_zero(self, offset: int, length: int, allocated: bool) -> Token:
        """Make the range read as zeroes (allocated: no holes)."""
        raise self._cannot("write zeroes")

    def submit_forward(self, offset: int, length: int, sink: ForwardSink) -> Token:
        """Hand the range to ``sink`` without reading it into a buffer."""
        raise self._cannot("forward data")

    def prepare_forward(self) -> None:
        """About to receive forwarded writes (:meth:`submit_write_from`)."""

    def submit_write_from(self, offset: int, length: int, fd: int, head: memoryview,
                          fd_offset: int | None) -> Token:
        """Write ``head`` then ``length - len(head)`` bytes the kernel takes from ``fd``."""
        raise self._cannot("write from a descriptor")

    def wait(self, token: Token) -> None:
        """Complete a token (raises the request's error)."""


def write_zero_buffers(h: Handle, offset: int, length: int, max_request: int) -> Token:
    """Zero a range by writing zeroes (for endpoints without a cheaper way). Submits
    every write, then waits for all but the last, which it returns."""
    tokens: list[Token] = []
    pos = 0
    while pos < length:
        k = min(length - pos, max_request, len(ZEROES))
        tokens.append(h.submit_write(offset + pos, memoryview(ZEROES)[:k]))
        pos += k
    for t in tokens[:-1]:
        h.wait(t)
    return tokens[-1] if tokens else None


class Endpoint:
    """One side of a copy. ``size`` is None for a stream source of unknown length (and a
    file destination that grows as needed)."""

    name = ""
    size: int | None = None
    #: at most this many handles (connections) are worth opening
    max_connections = 1
    #: a stream: offsets must be processed in order, once
    sequential = False
    #: largest single read or write request
    max_request = DEFAULT_MAX_REQUEST
    #: largest single zeroing request (a hole of the source is zeroed in pieces this big)
    max_zero = 64 << 20

    def open_handles(self, n: int) -> list[Handle]:
        """Up to ``n`` handles (fewer if the endpoint has fewer connections)."""
        raise NotImplementedError

    def extent_handle(self, handles: list[Handle]) -> Handle:
        """A handle for the work queue's extent map, which any worker's thread may call
        (``handles`` are the workers')."""
        return handles[0]

    def finish(self, total: int) -> None:
        """After the last write: ``total`` bytes were copied."""

    def close(self) -> None:
        pass


# --- NBD -------------------------------------------------------------------------------

class NBDHandle(Handle):
    """One connection to the export."""

    def __init__(self, ep: NBDEndpoint, client: Client) -> None:
        super().__init__(ep.name)
        self.ep = ep
        self.client = client
        self.forward_source = self.forward_destination = not client.tls_active

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        if not self.ep.block_status:
            yield offset, length, False
            return
        # one query for the whole rest under extended headers, 1 GiB pieces otherwise
        for e in self.client.iter_extents(offset, length, BASE_ALLOCATION):
            yield e.offset, e.length, e.zero

    def submit_read(self, offset: int, view: memoryview) -> Token:
        return self.client.submit_read(offset, view)

    def submit_write(self, offset: int, view: memoryview) -> Token:
        return self.client.submit_write(offset, view)

    def submit_zero(self, offset: int, length: int, allocated: bool) -> Token:
        if self.ep.can_zero:
            return self.client.submit_write_zeroes(offset, length,
                                                   CmdFlag.NO_HOLE if allocated else 0)
        return write_zero_buffers(self, offset, length, self.ep.max_request)

    def submit_forward(self, offset: int, length: int, sink: ForwardSink) -> Token:
        # the client calls sink.data(offset, length, head, socket fd) per data chunk
        return self.client.submit_read(offset, length, sink=sink)

    def prepare_forward(self) -> None:
        """A Unix socket queues at most its send buffer (212992 bytes by default) towards
        the peer: with the payload moved by the kernel, a larger one lets the destination
        server work through more writes while the source is being read. Capped by
        net.core.wmem_max. (TCP is left alone: setting it would turn off autotuning.)"""
        sock = self.client.socket
        if sock.family == socket.AF_UNIX:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)

    def submit_write_from(self, offset: int, length: int, fd: int, head: memoryview,
                          fd_offset: int | None) -> Token:
        return self.client.submit_write_from(offset, length, fd, head, fd_offset=fd_offset)

    def wait(self, token: Token) -> None:
        if token is not None:
            self.client.wait(token)


class NBDEndpoint(Endpoint):
    def __init__(self, uri: str, connections: int, write: bool, timeout: float | None,
                 extended_headers: bool = True) -> None:
        self.uri = parse_uri(uri)
        self.name = uri
        self.write = write
        self.timeout = timeout
        self.extended_headers = extended_headers
        first = self._connect(() if write else (BASE_ALLOCATION,))
        self.clients: list[Client] = [first]
        self.size = first.size
        if write and first.is_read_only():
            first.close()
            raise CopyError(f"{uri}: export is read-only")
        self.max_connections = connections if first.can_multi_conn() else 1
        self.block_status = BASE_ALLOCATION in first.meta_contexts.values()
        self.can_zero = first.can_zero()
        self.can_fast_zero = first.can_fast_zero()
        self.max_request = first.max_request
        # extended headers: a hole of any size is one WRITE_ZEROES (64-bit length)
        self.max_zero = (1 << 62) if first.extended else 0xFFFF0000

    def _connect(self, meta_contexts: tuple[str, ...]) -> Client:
        return connect(self.uri, timeout=self.timeout, meta_contexts=meta_contexts,
                       extended_headers=self.extended_headers)

    def open_handles(self, n: int) -> list[Handle]:
        n = max(1, min(n, self.max_connections))
        for _ in range(n - len(self.clients)):
            self.clients.append(self._connect(() if self.write else (BASE_ALLOCATION,)))
        return [NBDHandle(self, c) for c in self.clients[:n]]

    def extent_handle(self, handles: list[Handle]) -> Handle:
        if len(handles) > 1 and self.block_status:
            # each handle belongs to its worker's thread: map on a connection of our own
            c = self._connect((BASE_ALLOCATION,))
            self.clients.append(c)
            return NBDHandle(self, c)
        return handles[0]

    def close(self) -> None:
        errors = []
        for c in self.clients:
            res = c.close()
            if self.write and res.error:
                errors.append(res.error)
        if errors:
            raise CopyError(f"{self.name}: closing failed: {errors[0]}")


# --- files and block devices -----------------------------------------------------------

class FileHandle(Handle):
    """The file's descriptor, shared by every worker (positioned reads and writes)."""

    forward_source = True

    def __init__(self, ep: FileEndpoint) -> None:
        super().__init__(ep.name)
        self.ep = ep
        self.fd = ep.fd

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        end = offset + length
        pos = offset
        if not self.ep.regular:
            yield offset, length, False
            return
        while pos < end:  # each round moves pos forward, or returns
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains
                yield pos, end - pos, True
                return
            if data > pos:
                yield pos, min(data, end) - pos, True
                pos = min(data, end)
                continue
            hole = min(os.lseek(self.fd, pos, os.SEEK_HOLE), end)
            if hole <= pos:
                raise CopyError(f"{self.name}: SEEK_HOLE at {pos} did not move forward")
            yield pos, hole - pos, False
            pos = hole

    def submit_read(self, offset: int, view: memoryview) -> Token:
        n = os.preadv(self.fd, [view], offset)
        if n != len(view):
            raise CopyError(f"{self.name}: short read at {offset}")
        return None

    def submit_write(self, offset: int, view: memoryview) -> Token:
        pos = 0
        while pos < len(view):
            k = os.pwritev(self.fd, [view[pos:]], offset + pos)
            if k <= 0:
                raise CopyError(f"{self.name}: write of {len(view) - pos} bytes at offset "
                                f"{offset + pos} made no progress")
            pos += k
        return None

    def submit_zero(self, offset: int, length: int, allocated: bool) -> Token:
        if self.ep.fresh and not allocated:
            return None  # a freshly truncated file already reads as zeroes: stay sparse
        return write_zero_buffers(self, offset, length, DEFAULT_MAX_REQUEST)

    def submit_forward(self, offset: int, length: int, sink: ForwardSink) -> Token:
        sink.data(offset, length, _NO_HEAD, self.fd, offset)
        return None


class FileEndpoint(Endpoint):
    max_connections = 64

    def __init__(self, path: str, write: bool, size_hint: int | None = None) -> None:
        self.name = path
        self.write = write
        self.fresh = False
        if write:
            exists = os.path.exists(path)
            is_reg = not exists or stat.S_ISREG(os.stat(path).st_mode)
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            if is_reg:
                # like cp: replace the contents; a fresh file reads as zeroes everywhere,
                # so zero ranges are skipped and stay sparse
                os.ftruncate(self.fd, 0)
                os.ftruncate(self.fd, size_hint or 0)
                self.fresh = True
        else:
            self.fd = os.open(path, os.O_RDONLY)
        st = os.fstat(self.fd)
        self.regular = stat.S_ISREG(st.st_mode)
        if stat.S_ISBLK(st.st_mode):
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
        elif write and self.regular and size_hint is None:
            self.size = None  # a stream source: the file grows as needed
        else:
            self.size = st.st_size
        self._handle = FileHandle(self)

    def open_handles(self, n: int) -> list[Handle]:
        return [self._handle] * max(1, n)

    def finish(self, total: int) -> None:
        if self.write and self.regular and os.fstat(self.fd).st_size < total:
            os.ftruncate(self.fd, total)  # trailing zero ranges were skipped

    def close(self) -> None:
        if self.write:
            os.fsync(self.fd)
        os.close(self.fd)


# --- stdin / stdout --------------------------------------------------------------------

class BinaryStream(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...

    def write(self, data: memoryview, /) -> int | None: ...

    def flush(self) -> None: ...


class StreamHandle(Handle):
    """Reads or writes the stream in order: every byte, zeroes included (a stream has no
    earlier contents that could already be zero)."""

    def __init__(self, ep: StreamEndpoint) -> None:
        super().__init__(ep.name)
        self.stream = ep.stream

    def read_next(self, view: memoryview) -> int:
        n = 0
        while n < len(view):  # each round reads something, or ends
            k = self.stream.readinto(view[n:])
            if not k:
                break
            n += k
        return n

    def submit_write(self, offset: int, view: memoryview) -> Token:
        self.stream.write(view)  # a buffered stream writes it all or raises
        return None

    def submit_zero(self, offset: int, length: int, allocated: bool) -> Token:
        return write_zero_buffers(self, offset, length, DEFAULT_MAX_REQUEST)


class StreamEndpoint(Endpoint):
    sequential = True

    def __init__(self, stream: BinaryStream, write: bool) -> None:
        self.name = "-"
        self.stream = stream
        self.write = write
        self._handle = StreamHandle(self)

    def open_handles(self, n: int) -> list[Handle]:
        return [self._handle]

    def finish(self, total: int) -> None:
        if self.write:
            self.stream.flush()


def open_endpoint(spec: str, write: bool, connections: int, timeout: float | None,
                  size_hint: int | None = None, extended_headers: bool = True) -> Endpoint:
    """``-`` (stdin, or stdout when writing), an NBD URI, or a file or block device."""
    if spec == "-":
        stream = sys.stdout.buffer if write else sys.stdin.buffer
        return StreamEndpoint(cast(BinaryStream, stream), write)
    if is_uri(spec):
        return NBDEndpoint(spec, connections, write, timeout, extended_headers)
    return FileEndpoint(spec, write, size_hint)
