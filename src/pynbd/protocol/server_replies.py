"""Server core, replies: the bytes of every reply, simple, structured or extended as
negotiated (see :class:`~pynbd.protocol.server.ServerConnection`).

The driver passes each builder the request's offset (``req_offset``, which extended
replies echo) and the contexts a block status request asked for, and needs no other
knowledge of what was negotiated.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from pynbd.protocol import wire
from pynbd.protocol.constants import (
    EXTENDED_REPLY_MAGIC,
    MAX_EXTENTS_PER_CHUNK,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ReplyFlag,
    ReplyType,
)
from pynbd.protocol.errors import LocalProtocolError
from pynbd.protocol.server_types import ServerState

# Every request gets one of these: plain ints and pre-bound packs (packing an IntEnum
# or IntFlag takes a slower path, ~0.5 us a reply)
_DONE = int(ReplyFlag.DONE)
_NONE = int(ReplyType.NONE)
_OFFSET_DATA = int(ReplyType.OFFSET_DATA)
_SIMPLE = wire.SIMPLE_REPLY.pack
_CHUNK = wire.CHUNK.pack
_EXT = wire.EXT_REPLY.pack
_CHUNK_OFFSET = wire.CHUNK_OFFSET.pack
_EXT_OFFSET = wire.EXT_REPLY_OFFSET.pack


class ReplyBuilder(ServerState):
    """Reply building (a part of ServerConnection)."""

    # ``req_offset`` is the offset of the request being answered: extended replies echo
    # it (the spec: MUST match). Pass it always; compact replies ignore it.

    def _req_offset(self, req_offset: int | None, what: str) -> int:
        if req_offset is None:
            raise LocalProtocolError(f"{what} under extended headers needs req_offset "
                                     "(the request's offset)")
        return req_offset

    def simple_reply(self, cookie: int, error: int = 0) -> bytes:
        if self.extended_headers:
            raise LocalProtocolError("simple replies are not allowed under extended headers")
        return wire.encode_simple_reply(cookie, error)

    def ok_reply(self, cookie: int, req_offset: int | None = None) -> bytes:
        """Success without payload (WRITE, FLUSH, TRIM, ...)."""
        if self.extended_headers:
            return _EXT(EXTENDED_REPLY_MAGIC, _DONE, _NONE, cookie,
                        self._req_offset(req_offset, "ok_reply"), 0)
        if self.structured_replies:
            return _CHUNK(STRUCTURED_REPLY_MAGIC, _DONE, _NONE, cookie, 0)
        return _SIMPLE(SIMPLE_REPLY_MAGIC, 0, cookie)

    def error_reply(self, cookie: int, error: int, message: str = "",
                    req_offset: int | None = None) -> bytes:
        if self.extended_headers:
            return wire.encode_ext_error_chunk(cookie,
                                               self._req_offset(req_offset, "error_reply"),
                                               error, message, ReplyFlag.DONE)
        if self.structured_replies:
            return wire.encode_error_chunk(cookie, error, message, ReplyFlag.DONE)
        return wire.encode_simple_reply(cookie, error)

    def read_reply_header(self, cookie: int, offset: int, length: int,
                          done: bool = True, req_offset: int | None = None) -> bytes:
        """Header preceding ``length`` bytes of read data at ``offset`` (simple reply or
        OFFSET_DATA). ``req_offset`` defaults to ``offset`` (a reply in one piece)."""
        flags = _DONE if done else 0
        if self.extended_headers:
            ro = offset if req_offset is None else req_offset
            if length == 0:
                return _EXT(EXTENDED_REPLY_MAGIC, flags, _NONE, cookie, ro, 0)
            return _EXT_OFFSET(EXTENDED_REPLY_MAGIC, flags, _OFFSET_DATA, cookie, ro,
                               8 + length, offset)
        if self.structured_replies:
            if length == 0:
                # OFFSET_DATA needs at least 1 byte of data (chunk length >= 9): a
                # zero-length read succeeds with a NONE chunk
                return _CHUNK(STRUCTURED_REPLY_MAGIC, flags, _NONE, cookie, 0)
            return _CHUNK_OFFSET(STRUCTURED_REPLY_MAGIC, flags, _OFFSET_DATA, cookie,
                                 8 + length, offset)
        return _SIMPLE(SIMPLE_REPLY_MAGIC, 0, cookie)

    def hole_chunk(self, cookie: int, offset: int, length: int, done: bool,
                   req_offset: int | None = None) -> bytes:
        flags = ReplyFlag.DONE if done else 0
        if self.extended_headers:
            return wire.encode_ext_offset_hole(cookie, self._req_offset(req_offset, "hole_chunk"),
                                               offset, length, flags)
        if not self.structured_replies:
            raise LocalProtocolError("OFFSET_HOLE needs structured replies")
        return wire.encode_offset_hole(cookie, offset, length, flags)

    def done_chunk(self, cookie: int, req_offset: int | None = None) -> bytes:
        if self.extended_headers:
            return wire.encode_ext_chunk_header(cookie, ReplyType.NONE, ReplyFlag.DONE,
                                                self._req_offset(req_offset, "done_chunk"), 0)
        return wire.encode_chunk_header(cookie, 0, ReplyFlag.DONE, 0)

    def block_status_reply(self, cookie: int, extents: Iterable[tuple[int, int]],
                           done: bool = True, context_id: int | None = None, *,
                           contexts: Sequence[int] | None = None,
                           req_offset: int | None = None,
                           per_context: Mapping[int, Sequence[tuple[int, int]]] | None = None,
                           ) -> list[bytes]:
        """One status chunk per context: ``contexts`` (a Command's ``contexts``; default
        every selected one, or just ``context_id``), each with ``extents`` or its own
        list from ``per_context``. Extents are (length, flags) pairs; at most 2^20 go in
        a chunk, and compact replies cap an extent below 4 GiB (a shorter answer is
        allowed: the client asks again for the rest)."""
        if contexts is not None:
            ids = list(contexts)
        elif context_id is not None:
            ids = [context_id]
        else:
            ids = sorted(self.meta_contexts)
        if not ids:
            raise LocalProtocolError("block status reply for no metadata context")
        ext = list(extents)
        ro = self._req_offset(req_offset, "block_status_reply") \
            if self.extended_headers else 0
        out = []
        for i, cid in enumerate(ids):
            last = i == len(ids) - 1
            flags = ReplyFlag.DONE if (done and last) else 0
            lst = _cap_extents(per_context[cid] if per_context is not None and
                               cid in per_context else ext, self.extended_headers)
            if self.extended_headers:
                out.append(wire.encode_block_status_ext(cookie, ro, cid, lst, flags))
            else:
                out.append(wire.encode_block_status(cookie, cid, lst, flags))
        return out


#: compact BLOCK_STATUS extents must fit 32 bits; cut at a multiple of every allowed
#: minimum block size (<= 64 KiB)
_COMPACT_EXTENT_MAX = 0x100000000 - 0x10000


def _cap_extents(extents: Sequence[tuple[int, int]], extended: bool) -> list[tuple[int, int]]:
    out = list(extents[:MAX_EXTENTS_PER_CHUNK])
    if not out:
        raise LocalProtocolError("block status chunk needs at least one extent")
    if not extended:
        for i, (length, state) in enumerate(out):
            if length > _COMPACT_EXTENT_MAX:
                # the rest would no longer start where this one ends: stop here
                out = [*out[:i], (_COMPACT_EXTENT_MAX, state)]
                break
    return out


