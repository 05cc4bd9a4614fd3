"""Server core, transmission phase: request headers in (compact or extended), every
request validated against the negotiated export, ``Command`` or ``InvalidCommand`` out
(see :class:`~pynbd.protocol.server.ServerConnection`).

A refused request's payload is consumed as it streams in (bounded memory) before the
refusal is reported, so the stream stays in sync; absurd lengths drop the connection.
"""

from __future__ import annotations

from pynbd.protocol import wire
from pynbd.protocol.constants import (
    EXTENDED_REQUEST_MAGIC,
    REQUEST_MAGIC,
    Cmd,
    CmdFlag,
    Errno,
    TransmissionFlag,
)
from pynbd.protocol.errors import PeerProtocolError
from pynbd.protocol.server_types import (
    MAX_WRITE_DISCARD,
    NEED_DATA,
    Command,
    Disconnect,
    Event,
    ExportInfo,
    InvalidCommand,
    SafeClose,
    ServerState,
    State,
    _NeedData,
)

# Plain ints, not IntFlag: ``~`` of an IntFlag only covers the flag's defined bits, so
# ``flags & ~allowed`` would miss unknown bits. FUA "is valid for all commands" once
# SEND_FUA is negotiated (spec: the server MUST accept it, even by ignoring it).
_FLAGS_ALLOWED: dict[Cmd, int] = {
    Cmd.READ: int(CmdFlag.FUA | CmdFlag.DF),
    Cmd.WRITE: int(CmdFlag.FUA),
    Cmd.DISC: 0,
    Cmd.FLUSH: int(CmdFlag.FUA),
    Cmd.TRIM: int(CmdFlag.FUA),
    Cmd.CACHE: int(CmdFlag.FUA),
    Cmd.WRITE_ZEROES: int(CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO),
    Cmd.BLOCK_STATUS: int(CmdFlag.FUA | CmdFlag.REQ_ONE),
    Cmd.X_CLOSE: 0,
}
#: commands that need a transmission flag, and the refusal without it
_NEEDS: dict[Cmd, tuple[int, str]] = {
    Cmd.FLUSH: (int(TransmissionFlag.SEND_FLUSH), "FLUSH not supported on this export"),
    Cmd.TRIM: (int(TransmissionFlag.SEND_TRIM), "TRIM not supported on this export"),
    Cmd.WRITE_ZEROES: (int(TransmissionFlag.SEND_WRITE_ZEROES),
                       "WRITE_ZEROES not supported on this export"),
    Cmd.CACHE: (int(TransmissionFlag.SEND_CACHE), "CACHE not supported on this export"),
}
_MODIFYING = frozenset((Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES))
#: command numbers to commands (a dict lookup costs a tenth of ``Cmd(n)``)
_CMDS: dict[int, Cmd] = {int(c): c for c in Cmd}
_READ = Cmd.READ
_EXT_UNPACK = wire.EXT_REQUEST.unpack_from
_WRITE = Cmd.WRITE
_PAYLOAD_LEN = int(CmdFlag.PAYLOAD_LEN)
_FUA = int(CmdFlag.FUA)
_DF = int(CmdFlag.DF)
_FAST_ZERO = int(CmdFlag.FAST_ZERO)
_SEND_FUA = int(TransmissionFlag.SEND_FUA)
_SEND_FAST_ZERO = int(TransmissionFlag.SEND_FAST_ZERO)
_BLOCK_STATUS_PAYLOAD = int(TransmissionFlag.BLOCK_STATUS_PAYLOAD)


class RequestPhase(ServerState):
    """Request parsing and validation (a part of ServerConnection)."""

    _pending_invalid: InvalidCommand | None

    def _next_request(self) -> Event | _NeedData:
        if self.extended_headers:
            return self._next_ext_request()
        buf = self._buf
        if len(buf) < wire.REQUEST_SIZE:
            if len(buf) >= 4 and buf[:4] == wire.EXT_REQUEST_MAGIC_BYTES:
                raise _wrong_magic(EXTENDED_REQUEST_MAGIC, False)
            return NEED_DATA
        magic, flags, cmd, cookie, offset, length = wire.REQUEST.unpack_from(buf)
        if magic != REQUEST_MAGIC:
            raise _wrong_magic(magic, False)
        del buf[:wire.REQUEST_SIZE]
        # the fast path: a plain READ or WRITE inside the export needs no other test
        # (bounds set by OptionPhase._set_fast_path; anything else is fully validated)
        if cmd == 0:
            if not flags and length <= self._fast_read_max and \
                    offset + length <= self._fast_size:
                return Command(_READ, 0, cookie, offset, length)
        elif cmd == 1 and (not flags or flags == self._fast_write_flags) and \
                length <= self._fast_write_max and offset + length <= self._fast_size:
            if length:
                self._expect_payload(length)
            return Command(_WRITE, flags, cookie, offset, length)
        export = self.export
        assert export is not None
        command = _CMDS.get(cmd)
        if command is None:
            return InvalidCommand(cmd, flags, cookie, offset, length, Errno.EINVAL,
                                  f"unknown command {cmd}")
        if command is Cmd.WRITE:
            err = self._validate(command, flags, offset, length, export)
            if err is not None:
                if length > max(MAX_WRITE_DISCARD, self.block_size[2]):
                    raise PeerProtocolError(
                        f"WRITE payload of {length} bytes exceeds {MAX_WRITE_DISCARD}")
                inv = InvalidCommand(cmd, flags, cookie, offset, length, err[0], err[1])
                return self._refuse_payload(inv, length)
            if length:
                self._expect_payload(length)
            return Command(command, flags, cookie, offset, length)
        return self._command(command, flags, cookie, offset, length, export)

    def _command(self, command: Cmd, flags: int, cookie: int, offset: int, length: int,
                 export: ExportInfo) -> Event:
        """A request without payload (compact or extended): validate, then the event."""
        if command is _READ and not flags and length <= self._fast_read_max and \
                offset + length <= self._fast_size:
            return Command(_READ, 0, cookie, offset, length)
        if command is Cmd.DISC:
            self.state = State.CLOSED
            self._buf.clear()
            return Disconnect()
        err = self._validate(command, flags, offset, length, export)
        if err is not None:
            return InvalidCommand(command, flags, cookie, offset, length, err[0], err[1])
        if command is Cmd.X_CLOSE:
            self.state = State.CLOSED
            self._buf.clear()
            return SafeClose(cookie)
        if command is Cmd.BLOCK_STATUS:
            return Command(command, flags, cookie, offset, length,
                           tuple(sorted(self.meta_contexts)))
        return Command(command, flags, cookie, offset, length)

    # --- extended headers ---------------------------------------------------------

    def _ext_header(self) -> tuple[int, int, int, int, int] | None:
        """(flags, type, cookie, offset, length) of the next 32-byte request, or None
        until it is complete. A compact header is recognised from its magic rather
        than waiting for 4 bytes that may never come."""
        buf = self._buf
        if len(buf) < wire.EXT_REQUEST_SIZE:
            if len(buf) >= 4 and buf[:4] != wire.EXT_REQUEST_MAGIC_BYTES:
                raise _wrong_magic(int.from_bytes(buf[:4], "big"), True)
            return None
        magic, flags, cmd, cookie, offset, length = wire.EXT_REQUEST.unpack_from(buf)
        if magic != EXTENDED_REQUEST_MAGIC:
            raise _wrong_magic(magic, True)
        return flags, cmd, cookie, offset, length

    def _next_ext_request(self) -> Event | _NeedData:
        buf = self._buf
        if len(buf) >= wire.EXT_REQUEST_SIZE:
            # the fast path of a plain READ, as in _next_request (the same test _command
            # makes, without the calls on the way there)
            magic, flags, cmd, cookie, offset, length = _EXT_UNPACK(buf)
            if magic == EXTENDED_REQUEST_MAGIC and cmd == 0 and not flags and \
                    length <= self._fast_read_max and offset + length <= self._fast_size:
                del buf[:wire.EXT_REQUEST_SIZE]
                return Command(_READ, 0, cookie, offset, length)
        header = self._ext_header()
        if header is None:
            return NEED_DATA
        flags, cmd, cookie, offset, length = header
        export = self.export
        assert export is not None
        command = _CMDS.get(cmd)
        if command is Cmd.DISC or (not flags & _PAYLOAD_LEN and command is not Cmd.WRITE):
            # no payload: ``length`` is an effect length (64 bits)
            del self._buf[:wire.EXT_REQUEST_SIZE]
            if command is None:
                return InvalidCommand(cmd, flags, cookie, offset, length, Errno.EINVAL,
                                      f"unknown command {cmd}")
            return self._command(command, flags, cookie, offset, length, export)
        # a payload of ``length`` bytes follows the header. A WRITE always has one: the
        # spec wants NBD_CMD_FLAG_PAYLOAD_LEN on it, but qemu's client (10.0) leaves the
        # flag off, and refusing without reading the data would desynchronise the stream
        maximum = self.block_size[2]
        if length > maximum:
            # spec: SHOULD disconnect (reading it would be a denial of service)
            raise PeerProtocolError(
                f"request payload of {length} bytes exceeds the maximum payload {maximum}")
        if command is Cmd.WRITE:
            return self._ext_write(flags, cookie, offset, length, export)
        if command is Cmd.BLOCK_STATUS and self._status_payload_fits(length):
            return self._ext_block_status(flags, cookie, offset, length, export)
        # a command that takes no payload (or a malformed block status payload): the
        # spec wants the payload consumed, then EINVAL
        del self._buf[:wire.EXT_REQUEST_SIZE]
        inv = InvalidCommand(cmd, flags, cookie, offset, length, Errno.EINVAL,
                             self._unwanted_payload(command, cmd, length))
        return self._refuse_payload(inv, length)

    def _ext_write(self, flags: int, cookie: int, offset: int, length: int,
                   export: ExportInfo) -> Event | _NeedData:
        del self._buf[:wire.EXT_REQUEST_SIZE]
        plain = flags & ~_PAYLOAD_LEN
        if (not plain or plain == self._fast_write_flags) and \
                length <= self._fast_write_max and offset + length <= self._fast_size:
            if length:
                self._expect_payload(length)
            return Command(_WRITE, flags, cookie, offset, length)
        err = self._validate(Cmd.WRITE, plain, offset, length, export)
        if err is not None:
            inv = InvalidCommand(Cmd.WRITE, flags, cookie, offset, length, err[0], err[1])
            return self._refuse_payload(inv, length)
        if length:
            self._expect_payload(length)
        return Command(Cmd.WRITE, flags, cookie, offset, length)

    def _status_payload_fits(self, length: int) -> bool:
        """A block status payload naming 1..n of the selected contexts (small: it is
        bounded by their number, so the core waits for all of it)."""
        return bool(self.transmission_flags & _BLOCK_STATUS_PAYLOAD) and \
            8 <= length <= 8 + 4 * len(self.meta_contexts) and length % 4 == 0

    def _ext_block_status(self, flags: int, cookie: int, offset: int, length: int,
                          export: ExportInfo) -> Event | _NeedData:
        buf = self._buf
        size = wire.EXT_REQUEST_SIZE
        if len(buf) < size + length:
            return NEED_DATA
        effect, ids = wire.decode_block_status_payload(bytes(buf[size:size + length]))
        del buf[:size + length]
        cmd = Cmd.BLOCK_STATUS
        problem = ""
        if not ids:
            problem = "block status payload names no metadata context"
        elif len(set(ids)) != len(ids):
            problem = f"block status payload names a context id twice ({ids})"
        else:
            unknown = [i for i in ids if i not in self.meta_contexts]
            if unknown:
                problem = f"block status payload names unknown context id(s) {unknown}"
        if problem:
            return InvalidCommand(cmd, flags, cookie, offset, effect, Errno.EINVAL, problem)
        err = self._validate(cmd, flags & ~_PAYLOAD_LEN, offset, effect, export)
        if err is not None:
            return InvalidCommand(cmd, flags, cookie, offset, effect, err[0], err[1])
        return Command(cmd, flags, cookie, offset, effect, tuple(ids))

    def _unwanted_payload(self, command: Cmd | None, cmd: int, length: int) -> str:
        if command is Cmd.BLOCK_STATUS:
            if not self.transmission_flags & _BLOCK_STATUS_PAYLOAD:
                return "block status payload, but NBD_FLAG_BLOCK_STATUS_PAYLOAD was not offered"
            return (f"block status payload of {length} bytes (must be 8 + 4n with n "
                    f"between 1 and {len(self.meta_contexts)} selected contexts)")
        name = command.name if command is not None else f"command {cmd}"
        return f"{name} takes no payload (NBD_CMD_FLAG_PAYLOAD_LEN set)"

    # --- refusals ------------------------------------------------------------------

    def _refuse_payload(self, inv: InvalidCommand, length: int) -> Event | _NeedData:
        """Consume ``length`` payload bytes of a refused request, then report it."""
        if not length:
            return inv
        self._pending_invalid = inv
        self._start_discard(length)
        self.state = State.PAYLOAD_DISCARD
        return self._discard_payload()

    def _discard_payload(self) -> Event | _NeedData:
        if not self._discard():
            return NEED_DATA
        self.state = State.TRANSMISSION
        inv = self._pending_invalid
        assert inv is not None
        self._pending_invalid = None
        return inv

    def _validate(self, cmd: Cmd, flags: int, offset: int, length: int,  # noqa: C901
                  export: ExportInfo) -> tuple[Errno, str] | None:
        name = cmd.name
        allowed = _FLAGS_ALLOWED.get(cmd)
        if allowed is None:
            return Errno.EINVAL, f"{name} is not supported"
        if flags & ~allowed:
            return Errno.EINVAL, f"flags 0x{flags:x} not valid for {name}"
        tf = self.transmission_flags
        if cmd in _MODIFYING and export.read_only:
            return Errno.EPERM, f"{name} on read-only export {export.name!r}"
        if flags & _FUA and not tf & _SEND_FUA:
            return Errno.EINVAL, "FUA not supported on this export"
        if cmd is Cmd.X_CLOSE:
            if not self.x_close:
                return Errno.EINVAL, "unknown command 0x7f01 (NBD_OPT_X_CLOSE not negotiated)"
            if offset or length:
                return Errno.EINVAL, "NBD_CMD_X_CLOSE needs offset and length 0"
            return None
        need = _NEEDS.get(cmd)
        if need is not None and not tf & need[0]:
            return Errno.EINVAL, need[1]
        if cmd is Cmd.FLUSH:
            if offset or length:  # spec: reserved, MUST be all-zero
                return Errno.EINVAL, "FLUSH needs offset and length 0"
            return None
        if flags & _DF and not self.chunked:
            return Errno.EINVAL, "DF flag needs structured replies"
        if flags & _FAST_ZERO and not tf & _SEND_FAST_ZERO:
            return Errno.EINVAL, "FAST_ZERO not negotiated"
        if cmd is Cmd.BLOCK_STATUS:
            if not self.meta_contexts:
                return Errno.EINVAL, "BLOCK_STATUS without a negotiated metadata context"
            if length == 0:
                return Errno.EINVAL, "BLOCK_STATUS with length 0"
        return self._validate_range(cmd, offset, length, export)

    def _validate_range(self, cmd: Cmd, offset: int, length: int,
                        export: ExportInfo) -> tuple[Errno, str] | None:
        name = cmd.name
        maximum = self.block_size[2]
        if cmd in (Cmd.READ, Cmd.WRITE) and length > maximum:
            # spec: EOVERFLOW only for READ when DF is supported (reply chunks)
            overflow = cmd is Cmd.READ and self.chunked
            return Errno.EOVERFLOW if overflow else Errno.EINVAL, \
                f"{name} of {length} bytes exceeds the maximum payload {maximum}"
        if offset + length > export.size:
            err = Errno.ENOSPC if cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES) else Errno.EINVAL
            return err, (f"{name} at offset {offset} length {length} is past the end of "
                         f"export {export.name!r} (size {export.size})")
        minimum = export.block_size[0]
        if minimum > 1 and (offset % minimum or length % minimum):
            return Errno.EINVAL, f"{name} not aligned to the minimum block size {minimum}"
        return None


def _wrong_magic(magic: int, extended: bool) -> PeerProtocolError:
    """A request header opened by ``magic`` where the other form was negotiated."""
    if extended:
        if magic == REQUEST_MAGIC:
            return PeerProtocolError("compact request header after NBD_OPT_EXTENDED_HEADERS "
                                     "was negotiated")
        return PeerProtocolError(f"bad extended request magic 0x{magic:08x} "
                                 f"(expected 0x{EXTENDED_REQUEST_MAGIC:08x})")
    if magic == EXTENDED_REQUEST_MAGIC:
        return PeerProtocolError("extended request header, but NBD_OPT_EXTENDED_HEADERS "
                                 "was not negotiated")
    return PeerProtocolError(f"bad request magic 0x{magic:08x} "
                             f"(expected 0x{REQUEST_MAGIC:08x})")
