"""Server core, handshake and option phase: client flags, option haggling, the
selection of an export (see :class:`~pynbd.protocol.server.ServerConnection`).

Every option gets exactly one final reply; malformed option data is refused with
NBD_REP_ERR_INVALID while the stream stays in sync, data too large to buffer is
discarded (NBD_REP_ERR_TOO_BIG), and absurd lengths drop the connection.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from pynbd.protocol import wire
from pynbd.protocol.constants import (
    MAX_STRING,
    ClientFlag,
    CmdFlag,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
    opt_name,
)
from pynbd.protocol.errors import LocalProtocolError, PeerProtocolError
from pynbd.protocol.server_types import (
    MAX_OPTION_DATA,
    MAX_OPTION_DISCARD,
    MAX_OPTIONS,
    NEED_DATA,
    Aborted,
    Event,
    ExportInfo,
    ExportSelected,
    OptionHandled,
    ServerState,
    StartTLS,
    State,
    TLSMode,
    _NeedData,
)

_FUA = int(CmdFlag.FUA)
_SEND_FUA = int(TransmissionFlag.SEND_FUA)


class OptionPhase(ServerState):
    """Handshake and option haggling (a part of ServerConnection)."""

    _initiated: bool
    _options_seen: int
    #: the option whose data is being read or discarded, and its length
    _opt: int
    _opt_len: int

    # --- greeting ----------------------------------------------------------------

    def _client_flags(self) -> Event | _NeedData | None:
        if not self._initiated:
            raise LocalProtocolError("next_event() before initiate()")
        if len(self._buf) < wire.CLIENT_FLAGS.size:
            return NEED_DATA
        flags = wire.decode_client_flags(self._buf[:wire.CLIENT_FLAGS.size])
        del self._buf[:wire.CLIENT_FLAGS.size]
        if flags & ~_KNOWN_CLIENT_FLAGS:
            raise PeerProtocolError(f"client sent unknown client flags 0x{flags:08x}")
        self.fixed_newstyle = bool(flags & ClientFlag.C_FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & ClientFlag.C_NO_ZEROES)
        self.state = State.OPTIONS
        return None

    # --- options -----------------------------------------------------------------

    def _next_option_header(self) -> Event | _NeedData | None:
        if len(self._buf) < wire.OPTION_REQUEST.size:
            return NEED_DATA
        opt, length = wire.decode_option_header(self._buf)
        del self._buf[:wire.OPTION_REQUEST.size]
        self._options_seen += 1
        if self._options_seen > MAX_OPTIONS:
            raise PeerProtocolError(f"client sent more than {MAX_OPTIONS} options")
        if not self.fixed_newstyle and opt != Opt.EXPORT_NAME:
            raise PeerProtocolError(
                f"option {opt} from a client without NBD_FLAG_C_FIXED_NEWSTYLE")
        self._opt, self._opt_len = opt, length
        if length > MAX_OPTION_DATA:
            if opt == Opt.EXPORT_NAME or length > MAX_OPTION_DISCARD:
                raise PeerProtocolError(
                    f"option {opt_name(opt)} with absurd data length {length}")
            self._start_discard(length)
            self.state = State.OPTION_DISCARD
            return None
        self.state = State.OPTION_DATA
        return None

    def _discard_option(self) -> Event | _NeedData | None:
        if not self._discard():
            return NEED_DATA
        self.state = State.OPTIONS
        if self._tls_blocked() and self._opt not in (Opt.STARTTLS, Opt.ABORT):
            return self._reply_error(self._opt, Rep.ERR_TLS_REQD,
                                     "TLS is required: send NBD_OPT_STARTTLS first")
        return self._reply_error(self._opt, Rep.ERR_TOO_BIG,
                                 f"option data of {self._opt_len} bytes is too large")

    def _next_option_data(self) -> Event | _NeedData | None:
        if len(self._buf) < self._opt_len:
            return NEED_DATA
        data = bytes(self._buf[:self._opt_len])
        del self._buf[:self._opt_len]
        self.state = State.OPTIONS
        return self._handle_option(self._opt, data)

    def _reply(self, opt: int, rep: int, data: bytes = b"") -> None:
        self._out.append(wire.encode_option_reply(opt, rep, data))

    def _reply_error(self, opt: int, rep: Rep, message: str) -> OptionHandled:
        # the message is for humans; the spec allows a UTF-8 string with error replies
        # (cut on a character boundary: a byte cut could leave invalid UTF-8)
        self._reply(opt, rep, wire.truncate_utf8(message, MAX_STRING))
        return OptionHandled(opt, rep)

    def _ack(self, opt: int) -> OptionHandled:
        self._reply(opt, Rep.ACK)
        return OptionHandled(opt, Rep.ACK)

    def _tls_blocked(self) -> bool:
        return self.config.tls is TLSMode.REQUIRE and not self.tls_active

    def _handle_option(self, opt: int, data: bytes) -> Event | None:
        if opt == Opt.EXPORT_NAME:
            return self._opt_export_name(data)
        if opt == Opt.ABORT:
            self._reply(opt, Rep.ACK)
            self.state = State.CLOSED
            return Aborted()
        if opt == Opt.STARTTLS:
            return self._opt_starttls(data)
        if self._tls_blocked():
            return self._reply_error(opt, Rep.ERR_TLS_REQD,
                                     "TLS is required: send NBD_OPT_STARTTLS first")
        handler = _HANDLERS.get(opt)
        if handler is None or not handler.offered(self):
            return self._reply_error(opt, Rep.ERR_UNSUP, f"{opt_name(opt)} not supported")
        try:
            return handler.run(self, opt, data)
        except PeerProtocolError as exc:
            # a malformed option payload: the stream is still in sync, refuse the option
            return self._reply_error(opt, Rep.ERR_INVALID, str(exc))

    def _opt_structured_reply(self, opt: int, data: bytes) -> Event:
        if data:
            return self._reply_error(opt, Rep.ERR_INVALID,
                                     "NBD_OPT_STRUCTURED_REPLY takes no data")
        if self.extended_headers:
            return self._reply_error(
                opt, Rep.ERR_EXT_HEADER_REQD,
                "extended headers were negotiated; they supersede structured replies")
        self.structured_replies = True
        return self._ack(opt)

    def _opt_extended_headers(self, opt: int, data: bytes) -> Event:
        if data:
            return self._reply_error(opt, Rep.ERR_INVALID,
                                     "NBD_OPT_EXTENDED_HEADERS takes no data")
        self.extended_headers = True
        return self._ack(opt)

    def _opt_x_close(self, opt: int, data: bytes) -> Event:
        if data:
            return self._reply_error(opt, Rep.ERR_INVALID, "NBD_OPT_X_CLOSE takes no data")
        self.x_close = True
        return self._ack(opt)

    def _opt_export_name(self, data: bytes) -> Event:
        if self._tls_blocked():
            raise PeerProtocolError("NBD_OPT_EXPORT_NAME before STARTTLS on a TLS-only server")
        if self.extended_headers:
            # it cannot be refused, and its reply cannot say "compact headers only"
            raise PeerProtocolError("NBD_OPT_EXPORT_NAME after NBD_OPT_EXTENDED_HEADERS "
                                    "(the spec forbids it; use NBD_OPT_GO)")
        # a malformed name drops the connection: EXPORT_NAME cannot be refused
        name = wire.Reader(data, "NBD_OPT_EXPORT_NAME").rest_text()
        export = self.provider.lookup(name)
        if export is None:
            raise PeerProtocolError(f"NBD_OPT_EXPORT_NAME: no export named {name!r}")
        # the safe-close flag is only for clients that negotiated it; EXPORT_NAME
        # clients cannot, but keep the rule in one place
        flags = export.transmission_flags(self.structured_replies, self.x_close)
        self._out.append(wire.encode_export_name_reply(export.size, flags, self.no_zeroes))
        return self._enter_transmission(export, flags, name)

    def _opt_starttls(self, data: bytes) -> Event:
        opt = Opt.STARTTLS
        if self.config.tls is TLSMode.OFF:
            return self._reply_error(opt, Rep.ERR_UNSUP, "TLS is not configured on this server")
        if data:
            return self._reply_error(opt, Rep.ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        if self.tls_active:
            return self._reply_error(opt, Rep.ERR_INVALID, "TLS is already active")
        self._reply(opt, Rep.ACK)
        self.state = State.TLS_PENDING
        return StartTLS()

    def _opt_list(self, opt: int, data: bytes) -> Event:
        if data:
            return self._reply_error(opt, Rep.ERR_INVALID, "NBD_OPT_LIST takes no data")
        if not self.config.allow_list:
            return self._reply_error(opt, Rep.ERR_POLICY, "listing exports is disabled")
        for export in self.provider.list_exports():
            self._reply(opt, Rep.SERVER, wire.encode_rep_server(export.name, export.description))
        return self._ack(opt)

    def _opt_info_go(self, opt: int, data: bytes) -> Event:
        name, infos = wire.decode_info_request(data)
        export = self.provider.lookup(name)
        if export is None:
            return self._reply_error(opt, Rep.ERR_UNKNOWN, f"no export named {name!r}")
        flags = export.transmission_flags(
            self.chunked, self.x_close,
            self.extended_headers and bool(self._selected_contexts(export, name)))
        self._reply(opt, Rep.INFO, wire.encode_info_export(export.size, flags))
        seen: set[int] = set()
        for info in infos:
            if info in seen:
                continue
            seen.add(info)
            if info == Info.NAME:
                self._reply(opt, Rep.INFO, wire.encode_info_name(export.name))
            elif info == Info.DESCRIPTION and export.description:
                self._reply(opt, Rep.INFO, wire.encode_info_description(export.description))
            elif info == Info.BLOCK_SIZE:
                self._reply(opt, Rep.INFO,
                            wire.encode_info_block_size(*self._block_size_for(export)))
        if opt == Opt.INFO:
            return self._ack(opt)
        self._reply(opt, Rep.ACK)
        return self._enter_transmission(export, flags, name)

    def _opt_meta_context(self, opt: int, data: bytes) -> Event:
        is_set = opt == Opt.SET_META_CONTEXT
        if is_set:
            # SET replaces the previous selection even when it fails
            self._meta_export, self._meta = None, {}
        if not self.chunked:
            return self._reply_error(opt, Rep.ERR_INVALID,
                                     "negotiate NBD_OPT_STRUCTURED_REPLY or "
                                     "NBD_OPT_EXTENDED_HEADERS first")
        name, queries = wire.decode_meta_context_request(data)
        export = self.provider.lookup(name)
        if export is None:
            return self._reply_error(opt, Rep.ERR_UNKNOWN, f"no export named {name!r}")
        for q in queries:
            if ":" not in q:
                return self._reply_error(opt, Rep.ERR_INVALID,
                                         f"meta context query {q!r} has no namespace")
        if export.refused_contexts:
            refused = dict(export.refused_contexts)
            for q in queries:
                if q in refused:
                    return self._reply_error(opt, Rep.ERR_POLICY, f"{q}: {refused[q]}")
        selected: dict[int, str] = {}
        for i, ctx in enumerate(match_contexts(export.meta_contexts, queries, is_set),
                                start=1):
            ctx_id = i if is_set else 0
            if is_set:
                selected[ctx_id] = ctx
            self._reply(opt, Rep.META_CONTEXT, wire.encode_rep_meta_context(ctx_id, ctx))
        if is_set:
            self._meta_export, self._meta = name, selected
        return self._ack(opt)

    def _selected_contexts(self, export: ExportInfo, requested: str) -> dict[int, str]:
        """The contexts SET_META_CONTEXT selected, if it named this export."""
        if self._meta_export is not None and (
                self._meta_export == requested
                or self.provider.lookup(self._meta_export) == export):
            return self._meta
        return {}

    def _block_size_for(self, export: ExportInfo) -> tuple[int, int, int]:
        """The export's block size constraints with the server's maximum applied."""
        minimum, preferred, maximum = export.block_size
        maximum = min(maximum, self.config.max_request_size)
        if preferred > maximum:  # the spec: maximum >= preferred, both powers of two
            preferred = max(minimum, 1 << (maximum.bit_length() - 1))
        return minimum, preferred, max(maximum, minimum)

    def _set_fast_path(self, export: ExportInfo, flags: int) -> None:
        """What a plain READ or WRITE must satisfy to skip the full validation."""
        minimum, _, maximum = self.block_size
        plain = minimum <= 1
        self._fast_size = export.size
        self._fast_read_max = maximum if plain else -1
        self._fast_write_max = maximum if plain and not export.read_only else -1
        self._fast_write_flags = _FUA if flags & _SEND_FUA else 0

    def _enter_transmission(self, export: ExportInfo, flags: int,
                            requested: str) -> ExportSelected:
        self.export = export
        self.meta_contexts = dict(self._selected_contexts(export, requested))
        self.state = State.TRANSMISSION
        self.transmission_flags = flags
        self.block_size = self._block_size_for(export)
        self._set_fast_path(export, flags)
        return ExportSelected(export, flags, self.chunked, dict(self.meta_contexts),
                              self.x_close, self.extended_headers, self.block_size)

    def _forget_options(self) -> None:
        super()._forget_options()
        self._meta = {}


def match_contexts(available: Sequence[str], queries: Sequence[str],
                   is_set: bool) -> list[str]:
    """The contexts of ``available`` that ``queries`` select. LIST with no query lists
    all; LIST may name a whole namespace ("base:"); SET only selects exact names."""
    matched: list[str] = []
    for ctx in available:
        if not queries and not is_set:
            matched.append(ctx)
            continue
        for q in queries:
            # LIST: "ns:" names a namespace, and a query ending in ":" every context
            # under it (qemu: "qemu:dirty-bitmap:" lists every bitmap)
            if q == ctx or (not is_set and q.endswith(":") and ctx.startswith(q)):
                matched.append(ctx)
                break
    return matched


class _Handler(NamedTuple):
    """An option taken after the TLS gate: its handler, and whether it is offered."""

    run: Callable[[OptionPhase, int, bytes], Event]
    offered: Callable[[OptionPhase], bool] = lambda conn: True


_KNOWN_CLIENT_FLAGS = int(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)
_HANDLERS: dict[int, _Handler] = {
    Opt.LIST: _Handler(OptionPhase._opt_list),
    Opt.INFO: _Handler(OptionPhase._opt_info_go),
    Opt.GO: _Handler(OptionPhase._opt_info_go),
    Opt.STRUCTURED_REPLY: _Handler(OptionPhase._opt_structured_reply),
    Opt.EXTENDED_HEADERS: _Handler(OptionPhase._opt_extended_headers,
                                   lambda conn: conn.config.extended_headers),
    Opt.LIST_META_CONTEXT: _Handler(OptionPhase._opt_meta_context),
    Opt.SET_META_CONTEXT: _Handler(OptionPhase._opt_meta_context),
    Opt.X_CLOSE: _Handler(OptionPhase._opt_x_close, lambda conn: conn.config.x_close),
}
