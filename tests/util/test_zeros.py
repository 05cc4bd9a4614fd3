"""is_zero: every buffer type and size the sparse-aware paths hand it, a non-zero
byte anywhere (including past the first MiB and in the last byte) is seen."""

from __future__ import annotations

import pytest

from pynbd.util.zeros import is_zero


@pytest.mark.parametrize("n", [0, 1, 511, 4096, 65536, (1 << 20) - 1, 1 << 20,
                               (1 << 20) + 1, 3 * (1 << 20) + 7])
def test_is_zero_finds_any_nonzero_byte(n: int) -> None:
    buf = bytearray(n)
    assert is_zero(buf) and is_zero(bytes(buf)) and is_zero(memoryview(buf))
    for pos in {0, n // 2, n - 1, min(n - 1, (1 << 20) + 5)}:
        if n == 0:
            continue
        buf[pos] = 1
        assert not is_zero(buf) and not is_zero(memoryview(buf))
        assert not is_zero(memoryview(buf)[pos:pos + 1])
        assert is_zero(memoryview(buf)[:pos])
        buf[pos] = 0


def test_is_zero_of_non_byte_views() -> None:
    from array import array

    a = array("Q", [0] * 1000)
    assert is_zero(memoryview(a))
    a[999] = 1 << 60
    assert not is_zero(memoryview(a))
