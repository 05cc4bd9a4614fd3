"""The rules an NBD client follows, as pure functions: what an option's answer means,
which requests the spec forbids a client to send, how large a request may be and how
a larger one is cut, how block status answers read by context name."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pynbd.client._common import Extent
from pynbd.client.uri import NBDURI, parse_uri
from pynbd.protocol.client import ClientConnection, ExportInfo, OptionDone, State
from pynbd.protocol.constants import (
    MAX_BLOCK_SIZE_FIELD,
    MAX_PAYLOAD,
    Cmd,
    CmdFlag,
    Rep,
    TransmissionFlag,
    cmd_name,
)
from pynbd.protocol.errors import LocalProtocolError, NBDRequestError, OptionError

#: a command without payload over more than 4 GiB, without extended headers, goes out
#: in pieces of this size (a multiple of every allowed minimum block size)
EFFECT_PIECE = 0x100000000 - 0x10000
_ZEROES = bytes(1024 * 1024)


def as_uri(uri: str | NBDURI) -> NBDURI:
    return parse_uri(uri) if isinstance(uri, str) else uri


def check_option(done: OptionDone) -> OptionDone:
    if not done.ok:
        raise OptionError(done.option, done.reply, done.message)
    return done


def probe_ok(done: OptionDone) -> bool:
    """True for ACK; False for the refusals a server uses for unknown options."""
    if done.ok:
        return True
    if done.reply in (Rep.ERR_UNSUP, Rep.ERR_POLICY, Rep.ERR_INVALID, Rep.ERR_UNKNOWN,
                      Rep.ERR_PLATFORM):
        return False
    raise OptionError(done.option, done.reply, done.message)


def request_error(cmd: int, error: int, message: str, offset: int | None) -> NBDRequestError:
    return NBDRequestError(error, message, cmd_name(cmd), offset)


def max_request_for(info: ExportInfo) -> int:
    """Largest READ/WRITE to send: what the server advertised (NBD_INFO_BLOCK_SIZE),
    else the 32 MiB every server must accept."""
    if info.block_size is None:
        return MAX_PAYLOAD
    return max(info.block_size[0], min(info.block_size[2], MAX_BLOCK_SIZE_FIELD))


def effect_pieces(offset: int, length: int, piece: int = EFFECT_PIECE) -> list[tuple[int, int]]:
    """(offset, length) pieces of at most ``piece`` bytes (default: 32-bit lengths)."""
    return [(pos, min(piece, offset + length - pos))
            for pos in range(offset, offset + length, piece)]


def extents_by_name(contexts: Mapping[int, str], offset: int,
                    chunks: Mapping[int, tuple[tuple[int, int], ...]],
                    want: Sequence[str] | None = None) -> dict[str, list[Extent]]:
    """Block status chunks (context id -> (length, flags) pairs) as Extents by name."""
    out: dict[str, list[Extent]] = {}
    for ctx, extents in chunks.items():
        name = contexts[ctx]
        if want is not None and name not in want:
            continue
        pos = offset
        lst = []
        for ln, fl in extents:
            lst.append(Extent(pos, ln, fl))
            pos += ln
        out[name] = lst
    return out


# plain ints: IntFlag arithmetic is a Python-level call on the hot path
_CMD_NEEDS: dict[int, tuple[int, str]] = {
    int(Cmd.FLUSH): (int(TransmissionFlag.SEND_FLUSH), "FLUSH"),
    int(Cmd.TRIM): (int(TransmissionFlag.SEND_TRIM), "TRIM"),
    int(Cmd.WRITE_ZEROES): (int(TransmissionFlag.SEND_WRITE_ZEROES), "WRITE_ZEROES"),
    int(Cmd.CACHE): (int(TransmissionFlag.SEND_CACHE), "CACHE"),
}
_FLAG_NEEDS: dict[int, tuple[int, str]] = {
    int(CmdFlag.FUA): (int(TransmissionFlag.SEND_FUA), "FUA"),
    int(CmdFlag.DF): (int(TransmissionFlag.SEND_DF), "DF"),
    int(CmdFlag.FAST_ZERO): (int(TransmissionFlag.SEND_FAST_ZERO), "FAST_ZERO"),
}
_WRITES = (int(Cmd.WRITE), int(Cmd.TRIM), int(Cmd.WRITE_ZEROES))
_READ_ONLY = int(TransmissionFlag.READ_ONLY)
_RW = (int(Cmd.READ), int(Cmd.WRITE))
_BLOCK_STATUS = int(Cmd.BLOCK_STATUS)
_FLUSH = int(Cmd.FLUSH)
IN_TRANSMISSION = (State.TRANSMISSION, State.PAYLOAD)


def validate_request(ex: ExportInfo | None, conn: ClientConnection, max_request: int,
                     cmd: int, offset: int, length: int, flags: int) -> None:
    """The spec's client-side MUST NOTs, checked before a request is sent."""
    if ex is None or conn.state not in IN_TRANSMISSION:
        raise LocalProtocolError("not in the transmission phase")
    xf = ex.flags
    need = _CMD_NEEDS.get(cmd)
    if need is not None and not xf & need[0]:
        raise LocalProtocolError(f"server does not support {need[1]}")
    if flags:
        for f, (fneed, fname) in _FLAG_NEEDS.items():
            if flags & f and not xf & fneed:
                raise LocalProtocolError(f"server does not support NBD_CMD_FLAG_{fname}")
    if cmd in _WRITES and xf & _READ_ONLY:
        raise LocalProtocolError("export is read-only")
    if cmd == _BLOCK_STATUS and not conn.meta_contexts:
        raise LocalProtocolError("block status needs a negotiated meta context")
    if length > 0xFFFFFFFF and not conn.extended_headers:
        raise LocalProtocolError(f"a length of {length} bytes needs extended headers")
    if offset + length > ex.size and cmd != _FLUSH:
        raise LocalProtocolError(
            f"request [{offset}, {offset + length}) beyond the export size {ex.size}")
    if length > max_request and cmd in _RW:
        raise LocalProtocolError(
            f"request of {length} bytes exceeds the maximum {max_request}")


def zero_fill(view: memoryview) -> None:
    for pos in range(0, len(view), len(_ZEROES)):
        k = min(len(view) - pos, len(_ZEROES))
        view[pos:pos + k] = _ZEROES[:k]
