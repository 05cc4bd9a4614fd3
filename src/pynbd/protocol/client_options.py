"""Client core, handshake and option phase: the greeting, option requests and every
reply to them, validated (see :class:`~pynbd.protocol.client.ClientConnection`)."""

from __future__ import annotations

from pynbd.protocol import wire
from pynbd.protocol.client_types import (
    NEED_DATA,
    ClientState,
    Event,
    ExportEntry,
    ExportInfo,
    Handshake,
    MetaContext,
    OptionDone,
    State,
    _NeedData,
)
from pynbd.protocol.constants import (
    MAX_STRING,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    opt_name,
    rep_is_error,
)
from pynbd.protocol.errors import LocalProtocolError, PeerProtocolError

#: largest option reply payload accepted (longer ones drop the connection)
MAX_OPTION_REPLY = 1024 * 1024
#: total option reply bytes accepted for one option (e.g. a long NBD_OPT_LIST)
MAX_OPTION_TOTAL = 16 * 1024 * 1024


class OptionPhase(ClientState):
    """Handshake and option haggling (a part of ClientConnection)."""

    _opt: int
    _opt_replies: list[object]
    _opt_bytes: int
    _opt_info: ExportInfo | None
    _opt_export: str
    _meta_queries: tuple[str, ...]
    _meta_pending: dict[int, str]

    # --- greeting ----------------------------------------------------------------

    def _greeting(self) -> Event | _NeedData:
        buf = self._buf
        problem = wire.greeting_problem(buf[:16])
        if problem is not None:
            raise PeerProtocolError(problem)
        if len(buf) < wire.GREETING_SIZE:
            return NEED_DATA
        hflags = wire.decode_greeting(buf[:wire.GREETING_SIZE])
        del buf[:wire.GREETING_SIZE]
        if not hflags & HandshakeFlag.FIXED_NEWSTYLE:
            raise PeerProtocolError("server does not support fixed newstyle negotiation")
        self.handshake_flags = hflags
        self.no_zeroes = bool(hflags & HandshakeFlag.NO_ZEROES)
        cflags = ClientFlag.C_FIXED_NEWSTYLE
        if self.no_zeroes:
            cflags |= ClientFlag.C_NO_ZEROES
        self._out.append(wire.encode_client_flags(cflags))
        self.state = State.OPTIONS
        return Handshake(hflags, self.no_zeroes)

    # --- options -----------------------------------------------------------------

    def send_option(self, option: int, data: bytes = b"") -> bytes:
        """Bytes of one option request; then call next_event() until OptionDone.

        The data of INFO/GO/LIST_META_CONTEXT/SET_META_CONTEXT is parsed here to
        know what the replies refer to (use the ``wire.encode_*`` helpers).
        """
        if self.state is not State.OPTIONS:
            raise LocalProtocolError(f"send_option() in state {self.state.value}")
        if option == Opt.ABORT:
            self.state = State.CLOSED
            return wire.encode_option(option, data)
        self._opt = option
        self._opt_replies = []
        self._opt_bytes = 0
        self._opt_info = None
        if option in (Opt.INFO, Opt.GO):
            name, _ = wire.decode_info_request(data)
            self._opt_export = name
            self._opt_info = ExportInfo(name=name)
        elif option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            name, queries = wire.decode_meta_context_request(data)
            self._opt_export = name
            self._meta_queries = tuple(queries)
            if option == Opt.SET_META_CONTEXT:
                self._meta_pending = {}
        elif option == Opt.EXPORT_NAME:
            if self.extended_headers:
                raise LocalProtocolError("NBD_OPT_EXPORT_NAME after extended headers were "
                                         "negotiated (the spec forbids it; use NBD_OPT_GO)")
            self._opt_export = data.decode("utf-8")
            self.state = State.EXPORT_NAME_REPLY
            return wire.encode_option(option, data)
        self.state = State.OPTION_REPLY
        return wire.encode_option(option, data)

    def _export_name_reply(self) -> Event | _NeedData:
        need = wire.EXPORT_NAME_REPLY.size if self.no_zeroes else wire.EXPORT_NAME_REPLY_SIZE
        if len(self._buf) < need:
            return NEED_DATA
        size, flags, _ = wire.decode_export_name_reply(self._buf[:need])
        del self._buf[:need]
        info = ExportInfo(name=self._opt_export, size=size, flags=flags)
        self._enter_transmission(info)
        return OptionDone(Opt.EXPORT_NAME, Rep.ACK, info=info)

    def _next_option_reply(self) -> Event | _NeedData | None:
        head = wire.OPTION_REPLY.size
        if len(self._buf) < head:
            return NEED_DATA
        opt, rep, length = wire.decode_option_reply_header(self._buf)
        if opt != self._opt:
            raise PeerProtocolError(
                f"option reply for {opt_name(opt)} while waiting for {opt_name(self._opt)}")
        if length > MAX_OPTION_REPLY:
            raise PeerProtocolError(f"option reply of {length} bytes exceeds {MAX_OPTION_REPLY}")
        self._opt_bytes += length
        if self._opt_bytes > MAX_OPTION_TOTAL:
            raise PeerProtocolError(
                f"replies to {opt_name(opt)} exceed {MAX_OPTION_TOTAL} bytes")
        if len(self._buf) < head + length:
            return NEED_DATA
        data = bytes(self._buf[head:head + length])
        del self._buf[:head + length]
        return self._handle_option_reply(opt, rep, data)

    def _handle_option_reply(self, opt: int, rep: int, data: bytes) -> Event | None:
        if rep_is_error(rep):
            return self._option_done(rep, data.decode("utf-8", "replace"))
        if rep == Rep.ACK:
            if data:
                raise PeerProtocolError(f"NBD_REP_ACK to {opt_name(opt)} with {len(data)} bytes")
            return self._option_ack(opt)
        if rep == Rep.SERVER and opt == Opt.LIST:
            self._opt_replies.append(ExportEntry(*wire.decode_rep_server(data)))
            return None
        if rep == Rep.INFO and opt in (Opt.INFO, Opt.GO):
            self._handle_info(data)
            return None
        if rep == Rep.META_CONTEXT and opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            ctx_id, name = wire.decode_rep_meta_context(data)
            if len(name) > MAX_STRING:
                raise PeerProtocolError("meta context name too long")
            if opt == Opt.SET_META_CONTEXT:
                if ctx_id in self._meta_pending:
                    raise PeerProtocolError(f"meta context id {ctx_id} assigned twice")
                self._meta_pending[ctx_id] = name
            self._opt_replies.append(MetaContext(ctx_id, name))
            return None
        raise PeerProtocolError(f"unexpected option reply type {rep:#x} to {opt_name(opt)}")

    def _handle_info(self, data: bytes) -> None:
        info = self._opt_info
        assert info is not None
        itype = wire.info_type(data)
        if itype == Info.EXPORT:
            info.size, info.flags = wire.decode_info_export(data)
            self._opt_replies.append((itype, info.size, info.flags))
        elif itype == Info.NAME:
            info.canonical_name = wire.decode_info_name(data)
        elif itype == Info.DESCRIPTION:
            info.description = wire.decode_info_description(data)
        elif itype == Info.BLOCK_SIZE:
            mn, pref, mx = wire.decode_info_block_size(data)
            if mn == 0 or mn & (mn - 1) or mn > 65536 or pref < mn or pref & (pref - 1) \
                    or mx < mn:
                raise PeerProtocolError(f"invalid block size constraints {mn}/{pref}/{mx}")
            info.block_size = (mn, pref, mx)
        else:
            # unknown info types are ignored (spec: the client MUST ignore them)
            self._opt_replies.append((itype, data[2:]))

    def _option_ack(self, opt: int) -> Event:
        if opt == Opt.STRUCTURED_REPLY:
            self.structured_replies = True
        elif opt == Opt.EXTENDED_HEADERS:
            self.extended_headers = True
        elif opt == Opt.X_CLOSE:
            self.x_close = True
        elif opt == Opt.SET_META_CONTEXT:
            self.meta_contexts = dict(self._meta_pending)
            self._meta_export = self._opt_export
        elif opt == Opt.STARTTLS:
            done = OptionDone(opt, Rep.ACK, replies=tuple(self._opt_replies))
            self.state = State.TLS_PENDING
            if self._buf:
                raise PeerProtocolError("server sent data after acknowledging STARTTLS")
            return done
        info = self._opt_info
        if opt in (Opt.INFO, Opt.GO):
            assert info is not None
            if not any(isinstance(x, tuple) and x[0] == Info.EXPORT
                       for x in self._opt_replies):
                raise PeerProtocolError(
                    f"NBD_REP_ACK to {opt_name(opt)} without NBD_INFO_EXPORT")
        done = OptionDone(opt, Rep.ACK, replies=tuple(self._opt_replies), info=info)
        self.state = State.OPTIONS
        if opt == Opt.GO:
            assert info is not None
            self._enter_transmission(info)
        return done

    def _option_done(self, rep: int, message: str) -> Event:
        self.state = State.OPTIONS
        return OptionDone(self._opt, rep, message, tuple(self._opt_replies), self._opt_info)

    def _enter_transmission(self, info: ExportInfo) -> None:
        if self._meta_export is not None and self._meta_export != info.name:
            self.meta_contexts = {}  # contexts were negotiated for another export
        if not self.chunked:
            self.meta_contexts = {}
        self.export = info
        self.state = State.TRANSMISSION
