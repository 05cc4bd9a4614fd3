"""Is this buffer all zeros? One fast answer for every sparse-aware path (copy, backup,
copy-before-write, migration).

``memoryview == bytes`` (and ``memoryview == memoryview``) compares element by element
in CPython: 2.6 us per KiB, 3.4 ms per MiB, holding the GIL. ``bytes(view) == zeros`` is
a copy plus a memcmp: about 4 us per 64 KiB, 40 times faster.
"""

from __future__ import annotations

_CHUNK = 1 << 20
_ZEROS = bytes(_CHUNK)
_PEEK = 4096


def is_zero(buf: memoryview | bytes | bytearray) -> bool:
    """True when every byte of ``buf`` is 0 (an empty buffer is)."""
    view = memoryview(buf).cast("B") if not isinstance(buf, bytes) else buf
    n = len(view)
    # data usually shows in its first bytes: look there before copying a whole chunk
    if n > _PEEK and bytes(view[:_PEEK]) != _ZEROS[:_PEEK]:
        return False
    for pos in range(0, n, _CHUNK):
        part = view[pos:pos + _CHUNK]
        if bytes(part) != _ZEROS[:len(part)]:
            return False
    return True


__all__ = ["is_zero"]
