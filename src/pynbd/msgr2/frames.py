"""msgr2.1 frame assembly and incremental parsing (crc and secure mode), plus the payload
layouts of every control frame. Pure computation: no I/O.

A frame is a tag and 1-4 segments. On the wire (rev1):

* crc:    preamble(32) | seg0 | crc0 (if seg0) | seg1..3 | epilogue(13) (if nsegs > 1)
* secure: GCM(preamble + seg0[:48] padded to 48) | GCM(rest of seg0, padded to 16) (if
  seg0 > 48) | GCM(seg1..3 each padded to 16 + epilogue(16)) (if nsegs > 1)
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from pynbd.msgr2._types import Buffer
from pynbd.msgr2.constants import (
    CRC_LEN,
    CRYPTO_BLOCK,
    EPILOGUE_CRC_LEN,
    EPILOGUE_SECURE_LEN,
    FRAME_LATE_STATUS_ABORTED,
    FRAME_LATE_STATUS_ABORTED_MASK,
    FRAME_LATE_STATUS_COMPLETE,
    GCM_TAG_LEN,
    MAX_NUM_SEGMENTS,
    PREAMBLE_LEN,
    SECURE_INLINE_LEN,
    SEGMENT_ALIGN_DEFAULT,
    Tag,
)
from pynbd.msgr2.crc import preamble_crc, segment_crc
from pynbd.msgr2.crypto import GcmStream
from pynbd.msgr2.errors import ProtocolError, UsageError

_PREAMBLE = struct.Struct("<BB" + "IH" * MAX_NUM_SEGMENTS + "BB")
_U32 = struct.Struct("<I")
_EPILOGUE_CRC = struct.Struct("<BIII")
#: below this size segments are joined into one write; above, passed through as views
JOIN_LIMIT = 64 * 1024
DEFAULT_MAX_SEGMENT_LEN = 64 * 1024 * 1024
_ZEROS = bytes(64)


def pad16(n: int) -> int:
    return (n + CRYPTO_BLOCK - 1) & ~(CRYPTO_BLOCK - 1)


def _trim(lengths: list[int]) -> int:
    n = len(lengths)
    while n > 1 and lengths[n - 1] == 0:
        n -= 1
    return n


def encode_preamble(tag: int, lengths: Sequence[int], aligns: Sequence[int]) -> bytes:
    """The 32-byte preamble (trailing empty segments dropped, at least one kept)."""
    lens = list(lengths) + [0] * (MAX_NUM_SEGMENTS - len(lengths))
    nsegs = _trim(lens)
    fields: list[int] = []
    for i in range(MAX_NUM_SEGMENTS):
        used = i < nsegs
        fields += [lens[i] if used else 0, (aligns[i] if i < len(aligns) else 0) if used else 0]
    body = _PREAMBLE.pack(tag, nsegs, *fields, 0, 0)
    return body + _U32.pack(preamble_crc(body))


@dataclass(frozen=True)
class Preamble:
    tag: int
    nsegs: int
    lengths: tuple[int, int, int, int]
    aligns: tuple[int, int, int, int]
    flags: int


def decode_preamble(buf: Buffer, max_segment_len: int) -> Preamble:
    mv = memoryview(buf)
    (crc,) = _U32.unpack_from(mv, 28)
    if preamble_crc(mv[:28]) != crc:
        raise ProtocolError("frame preamble crc mismatch")
    vals = _PREAMBLE.unpack_from(mv, 0)
    tag, nsegs = vals[0], vals[1]
    lengths = (vals[2], vals[4], vals[6], vals[8])
    aligns = (vals[3], vals[5], vals[7], vals[9])
    if not 1 <= nsegs <= MAX_NUM_SEGMENTS:
        raise ProtocolError(f"frame preamble: bad segment count {nsegs}")
    for i in range(nsegs, MAX_NUM_SEGMENTS):
        if lengths[i]:
            raise ProtocolError(f"frame preamble: unused segment {i} has length {lengths[i]}")
    for i in range(nsegs):
        if lengths[i] > max_segment_len:
            raise ProtocolError(
                f"frame segment {i} length {lengths[i]} exceeds the maximum {max_segment_len}"
            )
    try:
        Tag(tag)
    except ValueError:
        raise ProtocolError(f"unknown frame tag {tag}") from None
    return Preamble(tag, nsegs, lengths, aligns, vals[10])


class FrameAssembler:
    """Builds on-wire frames. ``tx`` is set once secure mode starts. Large ciphertext
    buffers come from ``pool``: give them back with ``pool.put`` once written out."""

    def __init__(self, pool: BufferPool | None = None) -> None:
        self.tx: GcmStream | None = None
        self.pool = pool

    def build(
        self, tag: int, segments: Sequence[Buffer], aligns: Sequence[int] | None = None
    ) -> list[Buffer]:
        if not 1 <= len(segments) <= MAX_NUM_SEGMENTS:
            raise UsageError("a frame has 1 to 4 segments")
        lengths = [len(s) for s in segments]
        if aligns is None:
            aligns = [SEGMENT_ALIGN_DEFAULT] * len(segments)
        nsegs = _trim(lengths)
        pre = encode_preamble(tag, lengths, aligns)
        segs = list(segments[:nsegs])
        if self.tx is None:
            return self._build_crc(pre, segs)
        return self._build_secure(pre, segs)

    @staticmethod
    def _build_crc(pre: bytes, segs: list[Buffer]) -> list[Buffer]:
        out: list[Buffer] = [pre]
        s0 = segs[0]
        if len(s0):
            out.append(s0)
            out.append(_U32.pack(segment_crc(s0)))
        if len(segs) > 1:
            crcs = [segment_crc(s) for s in segs[1:]]
            crcs += [0] * (3 - len(crcs))
            out.extend(segs[1:])
            out.append(_EPILOGUE_CRC.pack(FRAME_LATE_STATUS_COMPLETE, *crcs))
        return _coalesce(out)

    def _build_secure(self, pre: bytes, segs: list[Buffer]) -> list[Buffer]:
        tx = self.tx
        assert tx is not None
        s0 = memoryview(segs[0])
        head = s0[:SECURE_INLINE_LEN]
        inline_pad = SECURE_INLINE_LEN - len(head)
        out: list[Buffer] = [tx.encrypt(b"".join((pre, head, _ZEROS[:inline_pad])))]
        if len(s0) > SECURE_INLINE_LEN:
            rest = s0[SECURE_INLINE_LEN:]
            p = pad16(len(rest)) - len(rest)
            out.append(tx.encrypt_parts([rest, _ZEROS[:p]] if p else [rest], len(rest) + p,
                                        self.pool))
        if len(segs) > 1:
            parts: list[Buffer] = []
            total = 0
            for s in segs[1:]:
                if len(s):
                    parts.append(s)
                    p = pad16(len(s)) - len(s)
                    if p:
                        parts.append(_ZEROS[:p])
                    total += len(s) + p
            parts.append(bytes([FRAME_LATE_STATUS_COMPLETE]) + bytes(EPILOGUE_SECURE_LEN - 1))
            total += EPILOGUE_SECURE_LEN
            out.append(tx.encrypt_parts(parts, total, self.pool))
        return _coalesce(out)


def _coalesce(chunks: list[Buffer]) -> list[Buffer]:
    """Join runs of small chunks so small frames are one write; keep large ones as is."""
    if sum(len(c) for c in chunks) <= JOIN_LIMIT:
        return [b"".join(chunks)]
    out: list[Buffer] = []
    small: list[Buffer] = []
    for c in chunks:
        if len(c) < 4096:
            small.append(c)
        else:
            if small:
                out.append(b"".join(small))
                small = []
            out.append(c)
    if small:
        out.append(b"".join(small))
    return out


class BufferPool:
    """Reusable large buffers, so multi-MiB frames do not page-fault fresh memory every
    time. ``get(n)`` returns a bytearray of at least ``n`` bytes; ``put`` gives it back
    (only when nothing references it any more)."""

    GRAIN = 64 * 1024

    def __init__(self, max_buffers: int = 8, min_size: int = 256 * 1024) -> None:
        self.max_buffers = max_buffers
        self.min_size = min_size
        self._free: list[bytearray] = []

    def get(self, n: int) -> bytearray:
        best = -1
        for i, b in enumerate(self._free):
            if n <= len(b) <= 2 * n + self.GRAIN and (best < 0 or len(b) < len(self._free[best])):
                best = i
        if best >= 0:
            return self._free.pop(best)
        return bytearray((n + self.GRAIN - 1) // self.GRAIN * self.GRAIN)

    def put(self, buf: object) -> None:
        if isinstance(buf, memoryview):
            buf = buf.obj
        if not isinstance(buf, bytearray) or len(buf) < self.min_size:
            return
        if any(b is buf for b in self._free):
            return
        self._free.append(buf)
        if len(self._free) > self.max_buffers:
            self._free.pop(0)


@dataclass(frozen=True)
class Frame:
    """A received frame: segments are views into the receive buffer ``buffer``."""

    tag: int
    segments: tuple[memoryview, ...]
    #: raw on-wire bytes (only kept while the auth signature needs them)
    raw: bytes = b""
    #: the buffer holding the segments (give it back to the pool when done with them)
    buffer: bytearray | None = None


class FrameReader:
    """Incremental frame parser. The caller asks :meth:`want` how many more bytes complete
    the current unit, writes them (:meth:`buffer` gives the target view so they can be
    received in place), then calls :meth:`advance`. Large bodies come from ``pool``."""

    def __init__(self, max_segment_len: int = DEFAULT_MAX_SEGMENT_LEN,
                 pool: BufferPool | None = None) -> None:
        self.rx: GcmStream | None = None
        self.max_segment_len = max_segment_len
        self.pool = pool
        self.record = False
        self._pre: Preamble | None = None
        self._pre_plain: memoryview | None = None
        self._pre_raw = b""
        self._store = bytearray(PREAMBLE_LEN)
        self._view = memoryview(self._store)
        self._have = 0
        self._reset_unit()

    # -- unit management -------------------------------------------------------------
    def _reset_unit(self) -> None:
        self._pre = None
        size = PREAMBLE_LEN if self.rx is None else PREAMBLE_LEN + SECURE_INLINE_LEN + GCM_TAG_LEN
        self._store = bytearray(size)
        self._view = memoryview(self._store)
        self._have = 0

    def _alloc(self, n: int) -> None:
        if self.pool is not None and n >= self.pool.min_size:
            self._store = self.pool.get(n)
        else:
            self._store = bytearray(n)
        self._view = memoryview(self._store)[:n]
        self._have = 0

    def want(self) -> int:
        return len(self._view) - self._have

    def buffer(self) -> memoryview:
        return self._view[self._have :]

    def feed(self, data: memoryview) -> tuple[int, Frame | None]:
        """Copy as much of ``data`` as the current unit needs; returns (consumed, frame)."""
        n = min(len(data), len(self._view) - self._have)
        self._view[self._have : self._have + n] = data[:n]
        return n, self.advance(n)

    def advance(self, n: int) -> Frame | None:
        self._have += n
        if self._have < len(self._view):
            return None
        if self._pre is None:
            return self._on_preamble()
        return self._finish(self._view)

    # -- parsing -----------------------------------------------------------------------
    def _on_preamble(self) -> Frame | None:
        buf = self._view
        if self.rx is None:
            plain = buf
        else:
            out = bytearray(PREAMBLE_LEN + SECURE_INLINE_LEN)
            self.rx.decrypt_into(buf, out)
            plain = memoryview(out)
        pre = decode_preamble(plain[:PREAMBLE_LEN], self.max_segment_len)
        self._pre = pre
        self._pre_plain = plain
        self._pre_raw = bytes(buf) if self.record else b""
        body = self._body_len(pre)
        if body == 0:
            return self._finish(memoryview(b""))
        self._alloc(body)
        return None

    def _body_len(self, pre: Preamble) -> int:
        lens = pre.lengths
        if self.rx is None:
            n = lens[0] + (CRC_LEN if lens[0] else 0)
            if pre.nsegs > 1:
                n += sum(lens[1 : pre.nsegs]) + EPILOGUE_CRC_LEN
            return n
        n = 0
        if lens[0] > SECURE_INLINE_LEN:
            n += pad16(lens[0] - SECURE_INLINE_LEN) + GCM_TAG_LEN
        if pre.nsegs > 1:
            n += sum(pad16(x) for x in lens[1 : pre.nsegs]) + EPILOGUE_SECURE_LEN + GCM_TAG_LEN
        return n

    def _finish(self, body: memoryview) -> Frame | None:
        pre = self._pre
        assert pre is not None and self._pre_plain is not None
        raw = self._pre_raw + bytes(body) if self.record else b""
        store = self._store if len(body) else None
        segs = self._parse_crc(pre, body) if self.rx is None else self._parse_secure(pre, body)
        self._reset_unit()
        if segs is None:  # aborted frame: dropped
            return None
        return Frame(pre.tag, segs, raw, store)

    @staticmethod
    def _late_status(status: int) -> bool:
        low = status & FRAME_LATE_STATUS_ABORTED_MASK
        if low == FRAME_LATE_STATUS_COMPLETE:
            return True
        if low == FRAME_LATE_STATUS_ABORTED:
            return False
        raise ProtocolError(f"bad late_status 0x{status:02x} in frame epilogue")

    def _parse_crc(self, pre: Preamble, mv: memoryview) -> tuple[memoryview, ...] | None:
        lens = pre.lengths
        segs: list[memoryview] = []
        s0 = mv[: lens[0]]
        pos = lens[0]
        if lens[0]:
            (crc,) = _U32.unpack_from(mv, pos)
            pos += CRC_LEN
            if segment_crc(s0) != crc:
                raise ProtocolError("frame segment 0 crc mismatch")
        segs.append(s0)
        if pre.nsegs > 1:
            for i in range(1, pre.nsegs):
                segs.append(mv[pos : pos + lens[i]])
                pos += lens[i]
            status, c1, c2, c3 = _EPILOGUE_CRC.unpack_from(mv, pos)
            if not self._late_status(status):
                return None
            for i, crc in zip(range(1, pre.nsegs), (c1, c2, c3), strict=False):
                if segment_crc(segs[i]) != crc:
                    raise ProtocolError(f"frame segment {i} crc mismatch")
        return tuple(segs)

    def _parse_secure(self, pre: Preamble, mv: memoryview) -> tuple[memoryview, ...] | None:
        """Decrypts in place: the segments are views into the receive buffer."""
        rx = self.rx
        assert rx is not None and self._pre_plain is not None
        lens = pre.lengths
        inline = self._pre_plain[PREAMBLE_LEN:]
        pos = 0
        if lens[0] > SECURE_INLINE_LEN:
            rest = lens[0] - SECURE_INLINE_LEN
            clen = pad16(rest)
            s0buf = bytearray(SECURE_INLINE_LEN + clen)
            s0buf[:SECURE_INLINE_LEN] = inline
            rx.decrypt_into(mv[: clen + GCM_TAG_LEN], memoryview(s0buf)[SECURE_INLINE_LEN:])
            pos = clen + GCM_TAG_LEN
            s0 = memoryview(s0buf)[: lens[0]]
        else:
            s0 = inline[: lens[0]]
        segs = [s0]
        if pre.nsegs > 1:
            ct = mv[pos:]
            plain = ct[: len(ct) - GCM_TAG_LEN]
            rx.decrypt_into(ct, plain)
            p = 0
            for i in range(1, pre.nsegs):
                segs.append(plain[p : p + lens[i]])
                p += pad16(lens[i])
            if not self._late_status(plain[p]):
                return None
        return tuple(segs)
