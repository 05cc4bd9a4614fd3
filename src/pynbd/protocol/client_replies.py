"""Client core, transmission phase: replies in (simple, structured or extended), each
checked against the request it answers, events out (see
:class:`~pynbd.protocol.client.ClientConnection`).

Everything the server sends is validated: magics, chunk types, read chunks outside the
requested range or overlapping earlier chunks, incomplete successful reads, unknown
cookies, lengths (bounded before anything is buffered). The compact and the extended
chunk headers lead to the same chunk handlers.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import NamedTuple

from pynbd.protocol import wire
from pynbd.protocol.client_types import (
    NEED_DATA,
    BlockStatusChunk,
    ClientState,
    Event,
    ReadData,
    ReadHole,
    ReplyDone,
    ReplyError,
    State,
    _Inflight,
    _NeedData,
)
from pynbd.protocol.constants import (
    EXTENDED_REPLY_MAGIC,
    MAX_EXTENTS_PER_CHUNK,
    MAX_STRING,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    ReplyFlag,
    ReplyType,
    cmd_name,
    reply_type_is_error,
)
from pynbd.protocol.errors import PeerProtocolError

#: largest non-data structured chunk (block status: 4 + 8 * 2^20, plus slack)
MAX_META_CHUNK = 4 + 8 * (1 << 20) + 4096
#: largest NBD_REPLY_TYPE_BLOCK_STATUS_EXT chunk (8 + 16 * 2^20, plus slack)
MAX_META_CHUNK_EXT = 8 + 16 * MAX_EXTENTS_PER_CHUNK + 4096
#: largest error chunk body (error, message length, message, offset, plus slack)
MAX_ERROR_CHUNK = 6 + MAX_STRING + 64

# plain ints for the hot path (IntFlag's & is a Python-level call)
_DONE = int(ReplyFlag.DONE)
_DF = int(CmdFlag.DF)
_REQ_ONE = int(CmdFlag.REQ_ONE)
_READ = int(Cmd.READ)
_BLOCK_STATUS = int(Cmd.BLOCK_STATUS)
_OFFSET = wire.OFFSET
_T_DATA = int(ReplyType.OFFSET_DATA)
_OFFSET_DATA_MIN = wire.OFFSET_DATA_MIN


class _StatusForm(NamedTuple):
    """The block status chunk of one header form: its type, body layout and bound."""

    name: str
    reply_type: int
    head: int  # context id (+ count) before the descriptors
    unit: int  # bytes per descriptor
    maximum: int
    #: the other form's type, refused in this one, and why
    other_type: int
    other_refusal: str


_COMPACT = _StatusForm("BLOCK_STATUS", ReplyType.BLOCK_STATUS, 4, 8, MAX_META_CHUNK,
                       ReplyType.BLOCK_STATUS_EXT,
                       "BLOCK_STATUS_EXT chunk without extended headers")
_EXTENDED = _StatusForm("BLOCK_STATUS_EXT", ReplyType.BLOCK_STATUS_EXT, 8, 16,
                        MAX_META_CHUNK_EXT, ReplyType.BLOCK_STATUS,
                        "compact BLOCK_STATUS chunk under extended headers (the spec "
                        "requires BLOCK_STATUS_EXT)")


class ReplyPhase(ClientState):
    """Reply parsing (a part of ClientConnection)."""

    def _next_reply(self) -> Event | _NeedData:
        if self._payload_done:
            self._payload_done = False
            return self._finish(self._payload_cookie)
        if self.extended_headers:
            return self._next_ext_chunk()
        buf = self._buf
        if len(buf) < 4:
            return NEED_DATA
        magic = buf[0] << 24 | buf[1] << 16 | buf[2] << 8 | buf[3]
        if magic == SIMPLE_REPLY_MAGIC:
            return self._simple_reply()
        if magic != STRUCTURED_REPLY_MAGIC:
            if magic == EXTENDED_REPLY_MAGIC:
                raise PeerProtocolError(
                    "extended reply, but extended headers were not negotiated")
            raise PeerProtocolError(f"bad reply magic 0x{magic:08x}")
        if not self.structured_replies:
            raise PeerProtocolError("structured reply chunk but structured replies were not "
                                    "negotiated")
        if len(buf) < wire.CHUNK_SIZE:
            return NEED_DATA
        _, cflags, ctype, cookie, length = wire.CHUNK.unpack_from(buf)
        op = self._inflight.get(cookie)
        if op is None:
            raise _unknown(cookie, "reply chunk")
        if ctype == _T_DATA:  # the hot path: no table lookup
            return self._data_chunk(op, cookie, ctype, cflags & _DONE, length,
                                    wire.CHUNK_SIZE)
        return _CHUNKS.get(ctype, ReplyPhase._other_chunk)(
            self, op, cookie, ctype, cflags & _DONE, length, wire.CHUNK_SIZE)

    def _next_ext_chunk(self) -> Event | _NeedData:
        """One 32-byte extended reply chunk (the only kind once negotiated)."""
        buf = self._buf
        size = wire.EXT_REPLY_SIZE
        if len(buf) < size:
            if len(buf) >= 4:
                magic = buf[0] << 24 | buf[1] << 16 | buf[2] << 8 | buf[3]
                if magic != EXTENDED_REPLY_MAGIC:
                    raise self._bad_ext_magic(magic)
            return NEED_DATA
        magic, cflags, ctype, cookie, roff, length = wire.EXT_REPLY.unpack_from(buf)
        if magic != EXTENDED_REPLY_MAGIC:
            raise self._bad_ext_magic(magic)
        op = self._inflight.get(cookie)
        if op is None:
            raise _unknown(cookie, "reply chunk")
        if roff != op.offset:
            raise PeerProtocolError(f"extended reply for cookie {cookie} carries offset "
                                    f"{roff}, the request's is {op.offset}")
        if ctype == _T_DATA:  # the hot path: no table lookup
            return self._data_chunk(op, cookie, ctype, cflags & _DONE, length, size)
        return _CHUNKS.get(ctype, ReplyPhase._other_chunk)(
            self, op, cookie, ctype, cflags & _DONE, length, size)

    def _bad_ext_magic(self, magic: int) -> PeerProtocolError:
        if magic in (SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC):
            return PeerProtocolError(f"compact reply (magic 0x{magic:08x}) after extended "
                                     "headers were negotiated")
        return PeerProtocolError(f"bad extended reply magic 0x{magic:08x}")


    def _simple_reply(self) -> Event | _NeedData:
        buf = self._buf
        if len(buf) < wire.SIMPLE_REPLY_SIZE:
            return NEED_DATA
        _, error, cookie = wire.SIMPLE_REPLY.unpack_from(buf)
        op = self._inflight.get(cookie)
        if op is None:
            raise _unknown(cookie, "simple reply")
        del buf[:wire.SIMPLE_REPLY_SIZE]
        if error:
            op.error, op.message = error, ""
            return self._finish(cookie)
        if op.cmd == _READ:
            if self.structured_replies:
                raise PeerProtocolError("simple reply to NBD_CMD_READ after structured "
                                        "replies were negotiated")
            if op.length:
                self._payload_cookie = cookie
                self._payload_done = True
                self._expect_payload(op.length)
                return ReadData(cookie, op.offset, op.length)
        elif op.cmd == _BLOCK_STATUS:
            raise PeerProtocolError("simple success reply to NBD_CMD_BLOCK_STATUS")
        return self._finish(cookie)

    # --- chunks (compact or extended header of ``hsize`` bytes) ----------------------

    def _data_chunk(self, op: _Inflight, cookie: int, ctype: int, done: int, length: int,
                    hsize: int) -> Event | _NeedData:
        if op.cmd != _READ:
            raise PeerProtocolError(f"OFFSET_DATA chunk in reply to {cmd_name(op.cmd)}")
        if length < _OFFSET_DATA_MIN:
            wire.decode_offset_data_length(length)  # says what is wrong with it
        buf = self._buf
        if len(buf) < hsize + 8:
            return NEED_DATA
        (offset,) = _OFFSET.unpack_from(buf, hsize)
        dlen = length - 8
        self._claim(op, offset, dlen, "OFFSET_DATA")
        del buf[:hsize + 8]
        self._payload_cookie = cookie
        self._payload_done = bool(done)
        self.payload_remaining = dlen  # (ByteStream._expect_payload, inline: hot path)
        self.state = State.PAYLOAD
        return ReadData(cookie, offset, dlen)

    def _hole_chunk(self, op: _Inflight, cookie: int, ctype: int, done: int, length: int,
                    hsize: int) -> Event | _NeedData:
        if op.cmd != _READ:
            raise PeerProtocolError(f"OFFSET_HOLE chunk in reply to {cmd_name(op.cmd)}")
        if length != wire.HOLE.size:
            raise PeerProtocolError(f"OFFSET_HOLE chunk of length {length} (must be 12)")
        body = self._body(hsize, length)
        if body is None:
            return NEED_DATA
        offset, hlen = wire.decode_hole(body)
        self._claim(op, offset, hlen, "OFFSET_HOLE")
        self._after_body(cookie, done)
        return ReadHole(cookie, offset, hlen)

    def _none_chunk(self, op: _Inflight, cookie: int, ctype: int, done: int, length: int,
                    hsize: int) -> Event | _NeedData:
        if length != 0:
            raise PeerProtocolError(f"NONE chunk with length {length}")
        if not done:
            raise PeerProtocolError("NONE chunk without NBD_REPLY_FLAG_DONE")
        del self._buf[:hsize]
        return self._finish(cookie)

    def _status_chunk(self, op: _Inflight, cookie: int, ctype: int, done: int, length: int,
                      hsize: int) -> Event | _NeedData:
        form = _EXTENDED if self.extended_headers else _COMPACT
        if ctype == form.other_type:
            raise PeerProtocolError(form.other_refusal)
        if op.cmd != _BLOCK_STATUS:
            raise PeerProtocolError(f"{form.name} chunk in reply to {cmd_name(op.cmd)}")
        if length < form.head + form.unit or (length - form.head) % form.unit:
            raise PeerProtocolError(f"{form.name} chunk of invalid length {length}")
        if length > form.maximum:
            raise PeerProtocolError(f"{form.name} chunk of {length} bytes is too large")
        body = self._body(hsize, length)
        if body is None:
            return NEED_DATA
        ctx, extents = wire.decode_extents(body, self.extended_headers)
        self._status_context(op, ctx)
        ev = self._extents(op, cookie, ctx, extents)
        self._after_body(cookie, done)
        return ev

    def _error_chunk(self, op: _Inflight, cookie: int, ctype: int, done: int, length: int,
                     hsize: int) -> Event | _NeedData:
        if length < wire.ERROR_BODY_MIN:
            raise PeerProtocolError(f"error chunk of length {length} (minimum 6)")
        if length > MAX_ERROR_CHUNK:
            raise PeerProtocolError(f"error chunk of {length} bytes is too large")
        body = self._body(hsize, length)
        if body is None:
            return NEED_DATA
        error, message, eoff = wire.decode_error_body(ctype, body)
        if eoff is not None and op.cmd in (_READ, _BLOCK_STATUS) and not (
                op.offset <= eoff < op.offset + op.length):
            raise PeerProtocolError(f"ERROR_OFFSET {eoff} outside the request")
        if not op.error:
            op.error, op.message, op.error_offset = error, message, eoff
        if done:
            return self._finish(cookie)
        return ReplyError(cookie, error, message, eoff)

    def _other_chunk(self, op: _Inflight, cookie: int, ctype: int, done: int, length: int,
                     hsize: int) -> Event | _NeedData:
        if reply_type_is_error(ctype):
            return self._error_chunk(op, cookie, ctype, done, length, hsize)
        kind = "extended" if self.extended_headers else "structured"
        raise PeerProtocolError(f"unknown {kind} reply chunk type {ctype}")

    def _body(self, hsize: int, length: int) -> bytes | None:
        """The chunk's body once all of it is buffered (the header and body are then
        dropped from the buffer), else None."""
        buf = self._buf
        if len(buf) < hsize + length:
            return None
        body = bytes(buf[hsize:hsize + length])
        del buf[:hsize + length]
        return body

    def _after_body(self, cookie: int, done: int) -> None:
        if done:  # the next event is the ReplyDone
            self._payload_cookie = cookie
            self._payload_done = True

    # --- what the chunks say -----------------------------------------------------

    def _claim(self, op: _Inflight, offset: int, length: int, what: str) -> None:
        end = offset + length
        if offset < op.offset or end > op.offset + op.length:
            raise PeerProtocolError(
                f"{what} chunk [{offset}, {end}) outside the request "
                f"[{op.offset}, {op.offset + op.length})")
        if op.flags & _DF and op.content_chunks:
            raise PeerProtocolError("second content chunk for a read with NBD_CMD_FLAG_DF")
        i = bisect.bisect_right(op.starts, offset)
        if (i and op.ends[i - 1] > offset) or (i < len(op.starts) and op.starts[i] < end):
            raise PeerProtocolError(f"{what} chunk [{offset}, {end}) overlaps an earlier chunk")
        op.starts.insert(i, offset)
        op.ends.insert(i, end)
        op.covered += length
        op.content_chunks += 1

    def _status_context(self, op: _Inflight, ctx: int) -> None:
        if ctx not in self.meta_contexts:
            raise PeerProtocolError(f"BLOCK_STATUS chunk for unnegotiated context id {ctx}")
        if op.contexts is not None and ctx not in op.contexts:
            raise PeerProtocolError(f"BLOCK_STATUS chunk for context id {ctx}, which the "
                                    f"request did not ask for ({list(op.contexts)})")
        if ctx in op.status_contexts:
            raise PeerProtocolError(f"two BLOCK_STATUS chunks for context id {ctx}")
        op.status_contexts.add(ctx)

    def _extents(self, op: _Inflight, cookie: int, ctx: int,
                 extents: tuple[tuple[int, int], ...]) -> Event:
        n = len(extents)
        if op.flags & _REQ_ONE and n != 1:
            raise PeerProtocolError(f"{n} extents in reply to a REQ_ONE block status")
        total = 0
        for i, (ln, _) in enumerate(extents):
            if ln == 0:
                raise PeerProtocolError("block status extent of length 0")
            if i < n - 1:
                total += ln
                if total >= op.length:
                    raise PeerProtocolError("block status extents run past the requested "
                                            "range")
        if op.flags & _REQ_ONE and extents[0][0] > op.length:
            raise PeerProtocolError("REQ_ONE block status extent longer than the request")
        return BlockStatusChunk(cookie, ctx, extents)

    def _finish(self, cookie: int) -> ReplyDone:
        op = self._inflight.pop(cookie)
        if self.state is State.CLOSING:
            self.state = State.CLOSED
        if not op.error:
            if op.cmd == _READ and self.chunked and op.covered != op.length:
                raise PeerProtocolError(
                    f"read reply for [{op.offset}, {op.offset + op.length}) completed "
                    f"successfully with only {op.covered} bytes covered")
            if op.cmd == _BLOCK_STATUS and not op.status_contexts:
                raise PeerProtocolError("block status reply without any BLOCK_STATUS chunk")
        return ReplyDone(cookie, op.cmd, op.error, op.message, op.error_offset)


def _unknown(cookie: int, what: str) -> PeerProtocolError:
    return PeerProtocolError(f"{what} with unknown cookie {cookie}")


_Handler = Callable[[ReplyPhase, _Inflight, int, int, int, int, int], Event | _NeedData]
_CHUNKS: dict[int, _Handler] = {
    ReplyType.OFFSET_DATA: ReplyPhase._data_chunk,
    ReplyType.OFFSET_HOLE: ReplyPhase._hole_chunk,
    ReplyType.NONE: ReplyPhase._none_chunk,
    ReplyType.BLOCK_STATUS: ReplyPhase._status_chunk,
    ReplyType.BLOCK_STATUS_EXT: ReplyPhase._status_chunk,
}
