"""What every part of one client connection shares: its phases, counters and limits,
and the attributes the parts read and write.

A connection (:class:`~pynbd.server.connection.Connection`) is one object built from
parts, one module each: negotiation and TLS (:mod:`.conn_negotiation`), running
requests inline (:mod:`.conn_requests`), running them off the loop on threads or a
backend's aio (:mod:`.conn_offload`), the reply queue (:mod:`.conn_output`) and what a
backend failure becomes (:mod:`.conn_errors`). They are mixins, not helper objects: a
method call on the request path costs the same wherever its class lives, while calling
through another object would add a lookup per request. :class:`ConnState` declares the
attributes (set in ``Connection.__init__``) and, for the type checker only, the methods
one part calls in another.
"""

from __future__ import annotations

import enum
import socket
from collections import deque
from typing import TYPE_CHECKING, Any

from pynbd.protocol.constants import CmdFlag
from pynbd.protocol.server import Command, Disconnect, SafeClose, ServerConnection
from pynbd.server.buffers import Buffer

if TYPE_CHECKING:
    from collections.abc import Callable

    from pynbd.protocol.constants import Cmd
    from pynbd.server.conn_negotiation import TLSLayer
    from pynbd.server.loop import Loop
    from pynbd.server.worker import ExportRuntime, Worker

RECV_SIZE = 256 * 1024
HANDSHAKE_RECV = 4096
#: reads at least this large are checked for holes (structured replies only)
SPARSE_READ_MIN = 64 * 1024
#: reads at least this large are sent on their own (sendfile or a pooled buffer)
BIG_REPLY = 64 * 1024
MAX_IOV = 512
#: stop reading and executing while this many reply bytes wait for the socket
HIGH_WATER = 8 * 1024 * 1024

# plain ints on the request path: ``int & IntFlag`` builds a new flag object (~2 us)
_FUA = int(CmdFlag.FUA)
_NO_HOLE = int(CmdFlag.NO_HOLE)
_FAST_ZERO = int(CmdFlag.FAST_ZERO)
_REQ_ONE = int(CmdFlag.REQ_ONE)
_DF = int(CmdFlag.DF)

OutItem = Any  # bytes | bytearray | memoryview | _FileSlice | Callable[[], None]


class Phase(enum.Enum):
    HANDSHAKE = "handshake"
    TLS_HANDSHAKE = "tls-handshake"
    TRANSMISSION = "transmission"
    CLOSING = "closing"  # DISC/safe close received: finish, flush, close
    CLOSED = "closed"


class _Payload:
    """A WRITE whose payload is still arriving."""

    __slots__ = ("buf", "cmd", "got", "mv")

    def __init__(self, cmd: Command, buf: Buffer, mv: memoryview, got: int) -> None:
        self.cmd = cmd
        self.buf = buf
        self.mv = mv
        self.got = got


class _Spliced:
    """A WRITE whose payload is being spliced into ``file`` (a FileBackend, whose
    descriptor ``fd`` is)."""

    __slots__ = ("cmd", "err", "fd", "file", "got")

    def __init__(self, cmd: Command, file: Any, fd: int, got: int) -> None:
        self.cmd = cmd
        self.file = file
        self.fd = fd
        #: payload bytes taken from the connection so far (written, or dropped after err)
        self.got = got
        #: the first write error; the rest of the payload is then dropped
        self.err: OSError | None = None


class Counters:
    __slots__ = ("bytes_read", "bytes_written", "errors", "requests")

    def __init__(self) -> None:
        self.bytes_read = 0
        self.bytes_written = 0
        self.requests = 0
        self.errors = 0

    def add(self, other: Counters) -> None:
        self.bytes_read += other.bytes_read
        self.bytes_written += other.bytes_written
        self.requests += other.requests
        self.errors += other.errors

    def as_dict(self) -> dict[str, int]:
        return {"bytes_read": self.bytes_read, "bytes_written": self.bytes_written,
                "requests": self.requests, "errors": self.errors}


class ConnState:
    """The attributes of one connection (see ``Connection.__init__``)."""

    worker: Worker
    loop: Loop
    sock: socket.socket
    fd: int
    id: int
    peer: str
    host: str
    proto: ServerConnection
    phase: Phase
    started: float
    bytes_in: int
    runtime: ExportRuntime | None
    counters: Counters
    structured: bool
    tls: TLSLayer | None
    _rbuf: bytearray
    _rmv: memoryview
    _wq: deque[OutItem]
    _wq_bytes: int
    _mask: int
    _payload: _Payload | _Spliced | None
    _parked: deque[tuple[Command, Buffer | None, memoryview | None]]
    inflight: int
    busy: dict[int, float]
    _aio_ready: list[tuple[Command, Buffer | None, memoryview | None, OSError | None, Any]]
    _wrote: bool
    _ending: Disconnect | SafeClose | None
    _eof: bool
    _timer: Any
    _sendfile_ok: bool
    _header_only: bool
    _final_flushing: bool
    _final_flush_done: bool
    _own: Any
    own_open: bool
    backend: Any
    _sendfile_fd: int
    _splice_fd: int
    _serial: Any
    waiting_turn: bool
    end_reason: str
    _debug: bool
    _final_flush_error: OSError | None

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    @property
    def negotiating(self) -> bool:
        return self.phase in (Phase.HANDSHAKE, Phase.TLS_HANDSHAKE)

    @property
    def export_name(self) -> str | None:
        return self.runtime.name if self.runtime is not None else None

    if TYPE_CHECKING:
        # defined in one part, called from another
        def close(self) -> None: ...
        def _guarded(self, fn: Callable[..., None], *args: Any) -> None: ...
        def _update_interest(self) -> None: ...
        def _can_execute(self) -> bool: ...
        def _process(self) -> None: ...
        def _maybe_finish(self) -> None: ...
        def _close_own(self) -> None: ...
        def _send(self, bufs: list[OutItem]) -> None: ...
        def _send_raw(self, bufs: list[OutItem]) -> None: ...
        def _submit(self, ev: Command, buf: Buffer | None, mv: memoryview | None) -> None: ...
        def _execute(self, ev: Command, out: list[OutItem]) -> None: ...
        def _do_write(self, ev: Command, mv: memoryview, out: list[OutItem]) -> None: ...
        def _unpark(self) -> None: ...
        def _bug(self, ev: Command, exc: BaseException) -> bytes: ...
        def _error(self, ev: Command, exc: OSError) -> bytes: ...
        def _log_bug(self, cmd: Cmd, exc: BaseException) -> None: ...
        def _on_eof(self) -> None: ...
        def _splice_target(self) -> int: ...
        def _unsplice(self) -> None: ...
        def _start_splice(self, ev: Command, out: list[OutItem]) -> bool: ...
