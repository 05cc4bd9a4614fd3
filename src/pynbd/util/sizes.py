"""Byte sizes as people type them: ``512``, ``64K``, ``256KiB``, ``1G``, ``2T``.

One parser for every size in pynbd (``memory:SIZE`` targets, ``--size``, ``--from``,
``--request-size``, ``--max-speed``), so they all mean the same: units are binary
(K = 1024), case does not matter, and ``B``/``iB`` after the unit are optional.
"""

from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
          "p": 1 << 50, "e": 1 << 60}
_SIZE = re.compile(r"\s*(\d+)\s*([kmgtpeb]?)(?:i?b)?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``512``, ``64K``, ``64M``, ``1G``, ``1GiB``, ``2T`` -> bytes (binary units).

    Raises ValueError (which argparse reports as an invalid value) for anything else:
    negative numbers, fractions, unknown units."""
    m = _SIZE.fullmatch(text)
    if not m:
        raise ValueError(f"invalid size {text!r} (expected e.g. 512, 64M, 1G, 2T)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]
