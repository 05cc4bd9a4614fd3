"""The one size parser: every size option and ``memory:SIZE`` spell sizes the same way."""

from __future__ import annotations

import argparse

import pytest

from pynbd.backends import open_backend
from pynbd.util.sizes import parse_size


@pytest.mark.parametrize("text,want", [
    ("0", 0), ("512", 512), (" 4096 ", 4096), ("1b", 1), ("64K", 64 << 10),
    ("64k", 64 << 10), ("64KB", 64 << 10), ("64KiB", 64 << 10), ("64kib", 64 << 10),
    ("1M", 1 << 20), ("1 MiB", 1 << 20), ("3G", 3 << 30), ("2T", 2 << 40),
    ("1P", 1 << 50), ("1E", 1 << 60), ("10m", 10 << 20),
])
def test_sizes(text: str, want: int) -> None:
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["", "M", "-1", "-1M", "1.5G", "1Q", "1 K B x", "0x10",
                                  "1GG", "ten"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


def test_argparse_reports_a_bad_size(capsys: pytest.CaptureFixture[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=parse_size)
    assert p.parse_args(["--size", "2M"]).size == 2 << 20
    with pytest.raises(SystemExit) as exc:
        p.parse_args(["--size", "2X"])
    assert exc.value.code == 2 and "--size" in capsys.readouterr().err


def test_memory_targets_use_it() -> None:
    b = open_backend("memory:3MiB")
    try:
        assert b.size == 3 << 20
    finally:
        b.close()
    with pytest.raises(ValueError, match="invalid size"):
        open_backend("memory:3.5M")
