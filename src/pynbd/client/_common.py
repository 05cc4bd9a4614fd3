"""What the clients hand back: requests, extents, read chunks, how a connection ended."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from pynbd.protocol.client import ExportEntry, ExportInfo, MetaContext
from pynbd.protocol.constants import Info
from pynbd.protocol.errors import NBDRequestError

__all__ = [
    "DEFAULT_INFOS",
    "FEATURES",
    "Chunk",
    "CloseResult",
    "ExportEntry",
    "ExportInfo",
    "Extent",
    "MetaContext",
    "ReadSink",
    "Request",
]

#: info requests sent with NBD_OPT_INFO / NBD_OPT_GO by default
DEFAULT_INFOS: tuple[int, ...] = (Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE)


@dataclass(frozen=True, slots=True)
class Extent:
    """One block status extent: ``flags`` in the context's meaning (base:allocation:
    bit 0 hole, bit 1 zero)."""

    offset: int
    length: int
    flags: int

    @property
    def hole(self) -> bool:
        return bool(self.flags & 1)

    @property
    def zero(self) -> bool:
        return bool(self.flags & 2)


@dataclass(frozen=True, slots=True)
class Chunk:
    """One piece of a read reply: ``data`` is None for a hole (reads as zeroes)."""

    offset: int
    length: int
    data: memoryview | None

    @property
    def hole(self) -> bool:
        return self.data is None


@dataclass(frozen=True, slots=True)
class CloseResult:
    """How a connection ended.

    ``safe`` is True only when the server acknowledged NBD_CMD_X_CLOSE without error
    (every acknowledged write is on permanent storage and the server closed cleanly).
    ``flushed`` is True when a FLUSH (or X_CLOSE) succeeded before the end.
    ``method`` is ``"x_close"``, ``"flush+disc"``, ``"disc"``, ``"abort"`` or ``"none"``.
    """

    safe: bool
    flushed: bool
    method: str
    error: str = ""


FEATURES = ("read-only", "rotational", "flush", "fua", "trim", "zero", "fast-zero", "df",
            "multi-conn", "cache", "safe-close", "block-status", "structured-replies",
            "extended-headers", "block-status-payload")


class ReadSink(Protocol):
    """Receives a read reply's payload without a buffer (``submit_read(..., sink=)``).

    ``data`` is called for each data chunk: ``head`` holds the first bytes of the chunk
    that the client had already received; the remaining ``length - len(head)`` bytes
    are waiting on the descriptor ``fd`` (the connection's socket) and ``data`` must
    consume exactly that many bytes from it before returning (for example with
    :meth:`Client.submit_write_from` on another connection). Over TLS, ``head`` is the
    whole chunk and ``fd`` is -1. ``hole`` is called for each chunk that reads as zeroes.
    An exception from either breaks the connection (the stream position is unknown).
    """

    def data(self, offset: int, length: int, head: memoryview, fd: int) -> None: ...

    def hole(self, offset: int, length: int) -> None: ...


class Request:
    """A request in flight (or completed) on a client. The asyncio driver keeps the
    future its callers await in ``waiter``."""

    __slots__ = ("chunks", "cmd", "cookie", "done", "error", "extents", "length", "offset",
                 "sink", "view", "waiter", "want", "zeroed")

    def __init__(self, cookie: int, cmd: int, offset: int, length: int,
                 view: memoryview | None = None, zeroed: bool = False,
                 chunks: list[Chunk] | None = None, sink: ReadSink | None = None) -> None:
        self.cookie = cookie
        self.cmd = cmd
        self.offset = offset
        self.length = length
        self.view = view
        self.zeroed = zeroed
        self.chunks = chunks
        self.sink = sink
        self.extents: dict[int, tuple[tuple[int, int], ...]] | None = None
        #: context names a block status asked for (None: all)
        self.want: tuple[str, ...] | None = None
        self.done = False
        self.error: NBDRequestError | None = None
        self.waiter: Any = None

    def __repr__(self) -> str:
        state = "error" if self.error else ("done" if self.done else "pending")
        return f"<Request {self.cookie} cmd={self.cmd} {self.offset}+{self.length} {state}>"
