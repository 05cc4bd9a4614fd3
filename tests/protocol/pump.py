"""The client core against the server core, in memory.

:class:`Pump` wires a :class:`~pynbd.protocol.client.ClientConnection` and a
:class:`~pynbd.protocol.server.ServerConnection` back to back: bytes one side produces
are fed to the other (in pieces of ``piece`` bytes, so every parser meets split
headers and payloads), and the server side runs requests against a bytearray per
export. No sockets, threads or clocks: what it shows is what the two state machines do
with each other, byte for byte.

A structured or extended READ is answered in 4 KiB pieces, all-zero ones as holes, so
reads exercise chunk reassembly; BLOCK_STATUS reports data/zero runs of 4 KiB for
``base:allocation`` and one clean extent for any other context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pynbd.protocol import wire
from pynbd.protocol.client import (
    NEED_DATA,
    BlockStatusChunk,
    ClientConnection,
    Handshake,
    OptionDone,
    ReadData,
    ReadHole,
    ReplyDone,
    ReplyError,
)
from pynbd.protocol.client import (
    ExportInfo as ClientExportInfo,
)
from pynbd.protocol.client import State as CState
from pynbd.protocol.constants import BASE_ALLOCATION, Cmd, CmdFlag, Info, Opt
from pynbd.protocol.server import NEED_DATA as S_NEED_DATA
from pynbd.protocol.server import (
    Aborted,
    Command,
    Disconnect,
    ExportInfo,
    ExportSelected,
    InvalidCommand,
    SafeClose,
    ServerConfig,
    ServerConnection,
    StartTLS,
)

PIECE = 4096


class Provider:
    def __init__(self, exports: Sequence[ExportInfo]) -> None:
        self.exports = {e.name: e for e in exports}

    def lookup(self, name: str) -> ExportInfo | None:
        return self.exports.get(name)

    def list_exports(self) -> Sequence[ExportInfo]:
        return list(self.exports.values())


@dataclass
class Reply:
    """What the client core reported for one request."""

    error: int = 0
    message: str = ""
    data: bytearray = field(default_factory=bytearray)
    #: (kind, offset, length) of each read chunk in arrival order
    chunks: list[tuple[str, int, int]] = field(default_factory=list)
    #: context id -> (length, flags) pairs
    extents: dict[int, tuple[tuple[int, int], ...]] = field(default_factory=dict)
    errors: list[ReplyError] = field(default_factory=list)


class Pump:
    def __init__(self, exports: Sequence[ExportInfo], config: ServerConfig | None = None,
                 piece: int = 1 << 20) -> None:
        self.server = ServerConnection(Provider(exports), config)
        self.client = ClientConnection()
        self.piece = piece
        self.stores = {e.name: bytearray(e.size) for e in exports}
        self.to_client = bytearray(self.server.initiate())
        self.to_server = bytearray()
        #: events the server core reported, in order
        self.server_events: list[object] = []
        self.selected: ExportSelected | None = None
        self.server_closed = False
        #: cookie -> (offset, the reply being collected)
        self._pending: dict[int, tuple[int, Reply]] = {}

    # --- the server side ------------------------------------------------------------

    def _serve(self) -> None:
        """Feed what the client sent to the server core (one piece at a time) and run
        every event, until it needs more than there is."""
        server = self.server
        while True:
            ev = server.next_event()
            self.to_client += server.take_output()
            if ev is S_NEED_DATA:
                if not self.to_server or self.server_closed:
                    return
                server.receive_data(self.to_server[:self.piece])
                del self.to_server[:self.piece]
                continue
            self.server_events.append(ev)
            self._handle(ev)

    def _handle(self, ev: object) -> None:
        server = self.server
        if isinstance(ev, ExportSelected):
            self.selected = ev
        elif isinstance(ev, StartTLS):
            # no real TLS in memory: the handshake "completes" at once
            server.tls_established()
        elif isinstance(ev, Command):
            self._execute(ev)
        elif isinstance(ev, InvalidCommand):
            self.to_client += server.error_reply(ev.cookie, ev.error, ev.message, ev.offset)
        elif isinstance(ev, SafeClose):
            self.to_client += server.ok_reply(ev.cookie, 0)
            self.server_closed = True
        elif isinstance(ev, Disconnect | Aborted):
            self.server_closed = True

    def _execute(self, ev: Command) -> None:
        server = self.server
        assert self.selected is not None
        store = self.stores[self.selected.export.name]
        off, n = ev.offset, ev.length
        if ev.cmd is Cmd.WRITE:
            mv = memoryview(store)[off:off + n]
            got = server.payload_into(mv)
            while got < n:  # the driver receives the rest straight into place
                k = min(self.piece, n - got, len(self.to_server))
                assert k, "the client sent less payload than it announced"
                mv[got:got + k] = self.to_server[:k]
                del self.to_server[:k]
                server.payload_received(k)
                got += k
            self.to_client += server.ok_reply(ev.cookie, off)
        elif ev.cmd is Cmd.READ:
            self._read_reply(ev, store)
        elif ev.cmd in (Cmd.WRITE_ZEROES, Cmd.TRIM):
            store[off:off + n] = bytes(n)
            self.to_client += server.ok_reply(ev.cookie, off)
        elif ev.cmd is Cmd.BLOCK_STATUS:
            per = {cid: self._extents(cid, store, off, n) for cid in ev.contexts}
            if ev.flags & CmdFlag.REQ_ONE:
                per = {cid: ext[:1] for cid, ext in per.items()}
            for chunk in server.block_status_reply(ev.cookie, (), contexts=ev.contexts,
                                                    req_offset=off, per_context=per):
                self.to_client += chunk
        else:  # FLUSH, CACHE
            self.to_client += server.ok_reply(ev.cookie, off)

    def _read_reply(self, ev: Command, store: bytearray) -> None:
        server = self.server
        off, n = ev.offset, ev.length
        if not server.chunked or n == 0 or ev.flags & CmdFlag.DF:  # DF: one chunk
            self.to_client += server.read_reply_header(ev.cookie, off, n)
            self.to_client += store[off:off + n]
            return
        for pos in range(off, off + n, PIECE):
            k = min(PIECE, off + n - pos)
            last = pos + k == off + n
            data = store[pos:pos + k]
            if any(data):
                self.to_client += server.read_reply_header(ev.cookie, pos, k, last, off)
                self.to_client += data
            else:
                self.to_client += server.hole_chunk(ev.cookie, pos, k, last, off)

    def _extents(self, cid: int, store: bytearray, off: int, n: int) -> list[tuple[int, int]]:
        end = min(off + n, len(store))
        if self.server.meta_contexts[cid] != BASE_ALLOCATION:
            return [(end - off, 0)]
        out: list[tuple[int, int]] = []
        for pos in range(off, end, PIECE):
            k = min(PIECE, end - pos)
            flags = 0 if any(store[pos:pos + k]) else 3  # hole + zero
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + k, flags)
            else:
                out.append((k, flags))
        return out

    # --- the client side ------------------------------------------------------------

    def _client_event(self) -> object:
        client = self.client
        while True:
            ev = client.next_event()
            if ev is not NEED_DATA:
                return ev
            if not self.to_client:
                self._serve()
                if not self.to_client:
                    raise AssertionError("both sides wait for the other")
            client.receive_data(self.to_client[:self.piece])
            del self.to_client[:self.piece]

    def handshake(self) -> Handshake:
        ev = self._client_event()
        assert isinstance(ev, Handshake)
        self.to_server += self.client.take_output()
        return ev

    def option(self, option: int, data: bytes = b"") -> OptionDone:
        self.to_server += self.client.send_option(option, data)
        ev = self._client_event()
        assert isinstance(ev, OptionDone), ev
        if option == Opt.STARTTLS and ev.ok:
            self.client.tls_established()
        return ev

    def go(self, name: str = "", infos: Sequence[int] = (Info.BLOCK_SIZE,)) -> OptionDone:
        return self.option(Opt.GO, wire.encode_info_request(name, infos))

    def negotiate(self, mode: str, name: str = "", meta: Sequence[str] = (BASE_ALLOCATION,),
                  x_close: bool = True) -> ClientExportInfo:
        """Handshake, reply mode ("simple", "structured" or "extended"), contexts,
        safe close, GO; the export as the client sees it."""
        self.handshake()
        if mode != "simple":
            opt = Opt.EXTENDED_HEADERS if mode == "extended" else Opt.STRUCTURED_REPLY
            assert self.option(opt).ok
            if meta:
                self.option(Opt.SET_META_CONTEXT, wire.encode_meta_context_request(name, meta))
        if x_close:
            self.option(Opt.X_CLOSE)
        done = self.go(name)
        assert done.ok and done.info is not None, done
        return done.info

    def request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                payload: bytes | None = None,
                contexts: tuple[int, ...] | None = None) -> Reply:
        """Send one request (and its payload) and collect the client core's events
        until its reply is done."""
        cookie = self.submit(cmd, offset, length, flags, payload, contexts)
        if cmd == Cmd.DISC:
            self._serve()
            return Reply()
        return self.replies()[cookie]

    def submit(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
               payload: bytes | None = None,
               contexts: tuple[int, ...] | None = None) -> int:
        cookie, header = self.client.request(cmd, offset, length, flags, contexts)
        self.to_server += header
        if payload is not None:
            self.to_server += payload
        self._pending[cookie] = (offset, Reply(data=bytearray(length if cmd == Cmd.READ
                                                              else 0)))
        return cookie

    def replies(self) -> dict[int, Reply]:
        """Every request in flight, answered: cookie -> what the client core said."""
        done: dict[int, Reply] = {}
        while self._pending:
            ev = self._client_event()
            offset, reply = self._pending[ev.cookie]  # type: ignore[attr-defined]
            if isinstance(ev, ReplyDone):
                reply.error, reply.message = ev.error, ev.message
                done[ev.cookie] = self._pending.pop(ev.cookie)[1]
            else:
                self._collect(reply, offset, ev)
        return done

    def _collect(self, reply: Reply, offset: int, ev: object) -> None:
        if isinstance(ev, ReadData):
            dest = memoryview(reply.data)[ev.offset - offset:ev.offset - offset + ev.length]
            got = self.client.payload_into(dest)
            while got < ev.length:
                if not self.to_client:
                    self._serve()
                k = min(self.piece, ev.length - got, len(self.to_client))
                dest[got:got + k] = self.to_client[:k]
                del self.to_client[:k]
                self.client.payload_received(k)
                got += k
            reply.chunks.append(("data", ev.offset, ev.length))
        elif isinstance(ev, ReadHole):
            reply.chunks.append(("hole", ev.offset, ev.length))
        elif isinstance(ev, BlockStatusChunk):
            reply.extents[ev.context_id] = ev.extents
        elif isinstance(ev, ReplyError):
            reply.errors.append(ev)
        else:
            raise AssertionError(f"unexpected event {ev!r}")

    @property
    def both_closed(self) -> bool:
        return self.client.state is CState.CLOSED and self.server_closed
