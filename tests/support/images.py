"""Disk images for tests and benchmarks: raw files of a given size with data where the
test wants it (given bytes, or random bytes reproducible from a seed) and holes
elsewhere.

    make_image(p, 32 * MiB, {0: b"boot", 20 * MiB: randbytes(MiB, seed=2)})
    make_image(p, 32 * MiB, {off: MiB for off in range(0, 32 * MiB, 2 * MiB)}, seed=1)
    make_image(p, 4 * GiB, fill=True, seed=1, sync=True)   # every byte data
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Mapping
from pathlib import Path

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

#: where an image has data: (offset, the bytes) or (offset, how many random bytes)
Extents = Mapping[int, bytes | int] | Iterable[tuple[int, bytes | int]]

_CHUNK = MiB  # a multiple of 4: chunked random data equals one randbytes() call


def randbytes(n: int, seed: int | None = None) -> bytes:
    """``n`` random bytes: the same ones for the same ``seed``; fresh ones (os.urandom)
    without a seed."""
    return os.urandom(n) if seed is None else random.Random(seed).randbytes(n)


class _Stream:
    """Random bytes from one generator (seeded) or from os.urandom (no seed)."""

    def __init__(self, seed: int | None) -> None:
        self.rng = None if seed is None else random.Random(seed)

    def take(self, n: int) -> bytes:
        return os.urandom(n) if self.rng is None else self.rng.randbytes(n)


def make_image(path: str | os.PathLike[str], size: int, data: Extents = (), *,
               seed: int | None = None, fill: bool = False, sparse: bool = True,
               sync: bool = False) -> Path:
    """A raw image file of ``size`` bytes at ``path`` (replaced if it exists).

    ``data`` is written in order (later extents win where they overlap): a ``bytes``
    value as given, an ``int`` value as that many random bytes. All random bytes come
    from one stream: ``random.Random(seed)`` (the same image for the same seed), or
    os.urandom without a seed. With ``fill`` every byte is random data first (streamed,
    any size). The rest are holes, unless ``sparse`` is false: then zeros are written
    (every block allocated). ``sync`` fsyncs the file. Returns the path.
    """
    out = Path(path)
    items = list(data.items() if isinstance(data, Mapping) else data)
    stream = _Stream(seed)
    with open(out, "wb") as f:
        f.truncate(size)
        if fill or not sparse:
            for off in range(0, size, _CHUNK):
                n = min(_CHUNK, size - off)
                f.write(stream.take(n) if fill else bytes(n))
        for off, blob in items:
            chunk = stream.take(blob) if isinstance(blob, int) else blob
            if off < 0 or off + len(chunk) > size:
                raise ValueError(f"extent at {off} (+{len(chunk)}) outside a {size}-byte image")
            f.seek(off)
            f.write(chunk)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    return out
