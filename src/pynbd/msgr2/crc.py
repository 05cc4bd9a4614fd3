"""Ceph's CRC32-C convention (raw Castagnoli register, no pre/post inversion) on top of the
C-accelerated ``crc32c`` package, which uses the standard (inverted) convention."""

from __future__ import annotations

import crc32c as _crc32c

from pynbd.msgr2._types import Buffer

_MASK = 0xFFFFFFFF
_std = _crc32c.crc32c


def ceph_crc32c(seed: int, data: Buffer) -> int:
    """ceph_crc32c(seed, data): raw register update, as Ceph computes it."""
    return (~_std(data, (~seed) & _MASK)) & _MASK


def preamble_crc(data: Buffer) -> int:
    return (~_std(data, _MASK)) & _MASK


def segment_crc(data: Buffer) -> int:
    """crc of a segment: seed -1; an empty segment gives 0xFFFFFFFF."""
    return (~_std(data, 0)) & _MASK
