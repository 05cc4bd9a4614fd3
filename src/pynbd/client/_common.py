"""Pieces shared by the blocking and asyncio clients."""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pynbd.client.uri import NBDURI, parse_uri
from pynbd.protocol import wire
from pynbd.protocol.client import (
    ClientConnection,
    ExportEntry,
    ExportInfo,
    MetaContext,
    OptionDone,
    cmd_name,
)
from pynbd.protocol.constants import (
    BASE_ALLOCATION,
    MAX_BLOCK_SIZE_FIELD,
    MAX_PAYLOAD,
    Cmd,
    CmdFlag,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)
from pynbd.protocol.errors import NBDRequestError, OptionError

__all__ = [
    "DEFAULT_INFOS",
    "Chunk",
    "CloseResult",
    "ExportEntry",
    "ExportInfo",
    "Extent",
    "FlagsMixin",
    "MetaContext",
    "check_option",
    "request_error",
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


def check_option(done: OptionDone) -> OptionDone:
    if not done.ok:
        raise OptionError(done.option, done.reply, done.message)
    return done


def request_error(cmd: int, error: int, message: str, offset: int | None) -> NBDRequestError:
    return NBDRequestError(error, message, cmd_name(cmd), offset)


def max_request_for(info: ExportInfo) -> int:
    """Largest READ/WRITE to send: what the server advertised (NBD_INFO_BLOCK_SIZE),
    else the 32 MiB every server must accept."""
    if info.block_size is None:
        return MAX_PAYLOAD
    return max(info.block_size[0], min(info.block_size[2], MAX_BLOCK_SIZE_FIELD))


#: a command without payload over more than 4 GiB, without extended headers, goes out
#: in pieces of this size (a multiple of every allowed minimum block size)
EFFECT_PIECE = 0x100000000 - 0x10000


def effect_pieces(offset: int, length: int) -> list[tuple[int, int]]:
    """(offset, length) pieces that fit 32-bit lengths."""
    return [(pos, min(EFFECT_PIECE, offset + length - pos))
            for pos in range(offset, offset + length, EFFECT_PIECE)]


def payload_contexts(conn: ClientConnection,
                     names: Sequence[str] | None) -> tuple[int, ...] | None:
    """Context ids for a block status payload naming ``names``, or None when the reply
    must cover every negotiated context (no names given, or the server does not take
    the payload form: then the caller filters). Unknown names are a caller error."""
    if names is None:
        return None
    by_name = {n: i for i, n in conn.meta_contexts.items()}
    missing = [n for n in names if n not in by_name]
    if missing:
        from pynbd.protocol.errors import LocalProtocolError

        raise LocalProtocolError(f"metadata context(s) {missing} were not negotiated "
                                 f"(negotiated: {sorted(by_name)})")
    ids = tuple(dict.fromkeys(by_name[n] for n in names))
    ex = conn.export
    if not conn.extended_headers or ex is None or \
            not ex.flags & TransmissionFlag.BLOCK_STATUS_PAYLOAD or \
            len(ids) == len(by_name):
        return None
    return ids


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


def info_data(name: str, infos: Sequence[int]) -> bytes:
    return wire.encode_info_request(name, list(infos))


def meta_data(name: str, queries: Sequence[str]) -> bytes:
    return wire.encode_meta_context_request(name, list(queries))


def dial_socket(uri: NBDURI, timeout: float | None) -> socket.socket:
    if uri.is_unix:
        assert uri.socket is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        path = uri.socket
        try:
            sock.connect("\0" + path[1:] if path.startswith("\0") else path)
        except BaseException:
            sock.close()
            raise
    else:
        assert uri.host is not None
        sock = socket.create_connection((uri.host, uri.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(timeout)
    return sock


def as_uri(uri: str | NBDURI) -> NBDURI:
    return parse_uri(uri) if isinstance(uri, str) else uri


class FlagsMixin:
    """Capability queries from the transmission flags (``export`` must be set)."""

    export: ExportInfo | None

    def _flag(self, flag: TransmissionFlag) -> bool:
        if self.export is None:
            raise RuntimeError("no export negotiated yet")
        return bool(self.export.flags & flag)

    @property
    def size(self) -> int:
        if self.export is None:
            raise RuntimeError("no export negotiated yet")
        return self.export.size

    @property
    def flags(self) -> int:
        if self.export is None:
            raise RuntimeError("no export negotiated yet")
        return self.export.flags

    def is_read_only(self) -> bool:
        return self._flag(TransmissionFlag.READ_ONLY)

    def is_rotational(self) -> bool:
        return self._flag(TransmissionFlag.ROTATIONAL)

    def can_flush(self) -> bool:
        return self._flag(TransmissionFlag.SEND_FLUSH)

    def can_fua(self) -> bool:
        return self._flag(TransmissionFlag.SEND_FUA)

    def can_trim(self) -> bool:
        return self._flag(TransmissionFlag.SEND_TRIM)

    def can_zero(self) -> bool:
        return self._flag(TransmissionFlag.SEND_WRITE_ZEROES)

    def can_fast_zero(self) -> bool:
        return self._flag(TransmissionFlag.SEND_FAST_ZERO)

    def can_df(self) -> bool:
        return self._flag(TransmissionFlag.SEND_DF)

    def can_multi_conn(self) -> bool:
        return self._flag(TransmissionFlag.CAN_MULTI_CONN)

    def can_cache(self) -> bool:
        return self._flag(TransmissionFlag.SEND_CACHE)

    def can_safe_close(self) -> bool:
        return self._flag(TransmissionFlag.X_SEND_CLOSE)

    def can_block_status_payload(self) -> bool:
        """The server takes block status queries naming their contexts (extended)."""
        return self._flag(TransmissionFlag.BLOCK_STATUS_PAYLOAD)


FEATURES = ("read-only", "rotational", "flush", "fua", "trim", "zero", "fast-zero", "df",
            "multi-conn", "cache", "safe-close", "block-status", "structured-replies",
            "extended-headers", "block-status-payload")


def list_result(done: OptionDone) -> list[ExportEntry]:
    return [r for r in check_option(done).replies if isinstance(r, ExportEntry)]


def meta_result(done: OptionDone) -> list[MetaContext]:
    return [r for r in check_option(done).replies if isinstance(r, MetaContext)]


def probe_ok(done: OptionDone) -> bool:
    """True for ACK; False for the refusals a server uses for unknown options."""
    if done.ok:
        return True
    if done.reply in (Rep.ERR_UNSUP, Rep.ERR_POLICY, Rep.ERR_INVALID, Rep.ERR_UNKNOWN,
                      Rep.ERR_PLATFORM):
        return False
    raise OptionError(done.option, done.reply, done.message)


CMD_FLAGS_ALLOWED = {
    Cmd.READ: CmdFlag.DF,
    Cmd.WRITE: CmdFlag.FUA,
    Cmd.FLUSH: 0,
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.CACHE: 0,
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.REQ_ONE,
}

BASE = BASE_ALLOCATION
OPT = Opt
