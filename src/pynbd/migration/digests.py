"""What both ends of a migration agree the image is: a sha256 per chunk, and one
digest of the whole image over them (see docs/migration.md, "Verified handover").

The source records the digest of every chunk it sends (:class:`ChunkDigests`), the
destination keeps the digest of every chunk it holds; a reconnecting source compares
the two lists to resend only what differs, and COMMIT carries :func:`image_digest` of
the source's list, which the destination checks against its own before taking over.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

DIGEST = hashlib.sha256
DIGEST_SIZE = 32
_ZERO_DIGESTS: dict[int, bytes] = {}


def chunk_digest(data: bytes | bytearray | memoryview) -> bytes:
    return DIGEST(data).digest()


def zero_digest(n: int) -> bytes:
    """The digest of ``n`` zero bytes (cached: holes are common)."""
    d = _ZERO_DIGESTS.get(n)
    if d is None:
        d = chunk_digest(bytes(n))
        _ZERO_DIGESTS[n] = d
    return d


def image_digest(chunk_digests: bytes | bytearray | memoryview, size: int, chunk: int) -> str:
    """The whole-image digest: sha256 over (size, chunk size, every per-chunk sha256)."""
    h = hashlib.sha256(f"pynbd-image:{size}:{chunk}:".encode())
    h.update(chunk_digests)
    return h.hexdigest()




class ChunkDigests:
    """The digest of each chunk of an image of ``size`` bytes, where known.

    A chunk's digest is known once all of it was written (or zeroed) in one piece, or
    once it was read back and hashed; a write that covers part of a chunk makes it
    unknown again.
    """

    def __init__(self, size: int, chunk: int) -> None:
        self.size = size
        self.chunk = chunk
        self.nchunks = (size + chunk - 1) // chunk
        self.digests = bytearray(self.nchunks * DIGEST_SIZE)
        self.valid = bytearray(self.nchunks)

    def _span(self, i: int) -> tuple[int, int]:
        a = i * self.chunk
        return a, min(a + self.chunk, self.size)

    def get(self, i: int) -> bytes:
        return bytes(self.digests[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE])

    def set(self, i: int, digest: bytes) -> None:
        self.digests[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE] = digest
        self.valid[i] = 1

    def wrote(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """``data`` was written at ``offset``: chunks it covers whole are known."""
        mv = memoryview(data)
        end = offset + len(mv)
        for i in range(offset // self.chunk, (end + self.chunk - 1) // self.chunk):
            a, b = self._span(i)
            if a >= offset and b <= end:
                self.set(i, chunk_digest(mv[a - offset:b - offset]))
            else:
                self.valid[i] = 0

    def zeroed(self, offset: int, length: int) -> None:
        """``[offset, offset+length)`` now reads as zeroes."""
        end = offset + length
        for i in range(offset // self.chunk, (end + self.chunk - 1) // self.chunk):
            a, b = self._span(i)
            if a >= offset and b <= end:
                self.set(i, zero_digest(b - a))
            else:
                self.valid[i] = 0

    def complete(self, read: Callable[[int, int], bytes | bytearray]) -> bytes:
        """Every digest, hashing what ``read(offset, length)`` returns for chunks
        whose digest is not known."""
        for i in range(self.nchunks):
            if not self.valid[i]:
                a, b = self._span(i)
                self.set(i, chunk_digest(read(a, b - a)))
        return bytes(self.digests)

    def differing(self, theirs: bytes) -> list[int]:
        """The known chunks whose digest ``theirs`` (a whole list) does not match; they
        become unknown here."""
        out = []
        for i in range(self.nchunks):
            if self.valid[i] and theirs[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE] != \
                    self.digests[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE]:
                self.valid[i] = 0
                out.append(i)
        return out

    def digest(self) -> str:
        return image_digest(self.digests, self.size, self.chunk)
