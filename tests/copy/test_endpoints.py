"""The endpoints behind the copy: what each side can do, through the same interface."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from pynbd.client import connect
from pynbd.copy.endpoints import (
    FileEndpoint,
    NBDEndpoint,
    StreamEndpoint,
    open_endpoint,
)
from pynbd.copy.errors import CopyError
from tests.client.conftest import IMAGE_DATA, IMAGE_SIZE, TIMEOUT, Servers
from tests.support.images import make_image

MiB = 1 << 20


def test_file_extents_follow_the_holes(tmp_path: Path) -> None:
    p = make_image(tmp_path / "f", 8 * MiB, {2 * MiB: b"x" * MiB})
    ep = FileEndpoint(str(p), write=False)
    try:
        (h,) = ep.open_handles(1)
        assert list(h.extents(0, 8 * MiB)) == [(0, 2 * MiB, True), (2 * MiB, MiB, False),
                                               (3 * MiB, 5 * MiB, True)]
        # a range inside: clipped to it
        assert list(h.extents(MiB, 2 * MiB)) == [(MiB, MiB, True), (2 * MiB, MiB, False)]
        assert h.forward_source and not h.forward_destination
    finally:
        ep.close()


def test_file_destination_is_fresh_and_sparse(tmp_path: Path) -> None:
    p = tmp_path / "out"
    p.write_bytes(b"old" * 1000)
    ep = FileEndpoint(str(p), write=True, size_hint=4 * MiB)
    try:
        (h,) = ep.open_handles(1)
        assert ep.size == 4 * MiB and ep.fresh
        assert h.submit_zero(0, 4 * MiB, allocated=False) is None
        assert os.stat(p).st_blocks == 0  # nothing written: it already reads as zeroes
        h.submit_write(MiB, memoryview(b"data"))
        h.submit_zero(0, 4, allocated=True)
        ep.finish(4 * MiB)
    finally:
        ep.close()
    data = p.read_bytes()
    assert len(data) == 4 * MiB and data[MiB:MiB + 4] == b"data"
    assert data.count(0) == 4 * MiB - 4


def test_file_cannot_read_sequentially(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"abc")
    ep = FileEndpoint(str(p), write=False)
    try:
        (h,) = ep.open_handles(1)
        with pytest.raises(CopyError, match="cannot read sequentially"):
            h.read_next(memoryview(bytearray(3)))
        with pytest.raises(CopyError, match="short read"):
            h.submit_read(0, memoryview(bytearray(10)))
    finally:
        ep.close()


def test_stream_writes_every_byte_in_order() -> None:
    out = io.BytesIO()
    ep = StreamEndpoint(out, write=True)
    (h,) = ep.open_handles(4)  # a stream has one handle whatever is asked for
    assert ep.sequential and ep.size is None
    h.submit_write(0, memoryview(b"head"))
    assert h.submit_zero(4, 5 * MiB + 3, allocated=False) is None
    h.submit_write(5 * MiB + 7, memoryview(b"tail"))
    ep.finish(5 * MiB + 11)
    assert out.getvalue() == b"head" + bytes(5 * MiB + 3) + b"tail"
    with pytest.raises(CopyError, match="cannot forward"):
        h.submit_forward(0, 1, None)  # type: ignore[arg-type]


def test_stream_source_reads_until_the_end() -> None:
    ep = StreamEndpoint(io.BufferedReader(io.BytesIO(b"x" * 10_000)), write=False)
    (h,) = ep.open_handles(1)
    buf = memoryview(bytearray(4096))
    assert [h.read_next(buf) for _ in range(4)] == [4096, 4096, 1808, 0]


def test_open_endpoint_picks_by_spelling(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"abc")
    ep = open_endpoint(str(p), False, 4, None)
    assert isinstance(ep, FileEndpoint) and ep.size == 3
    ep.close()
    assert isinstance(open_endpoint("-", True, 4, None), StreamEndpoint)


def test_nbd_endpoint(servers: Servers) -> None:
    src = servers.start("qemu-nbd", "unix")
    ep = NBDEndpoint(src.uri(), connections=3, write=False, timeout=TIMEOUT)
    try:
        assert ep.size == IMAGE_SIZE and ep.block_status
        handles = ep.open_handles(3)
        assert len(handles) == ep.max_connections
        data = [e for e in handles[0].extents(0, IMAGE_SIZE) if not e[2]]
        assert all(any(o <= off < o + ln for o, ln, _ in data) for off, _ in IMAGE_DATA)
        buf = memoryview(bytearray(4096))
        off, blob = IMAGE_DATA[0]
        handles[-1].wait(handles[-1].submit_read(off, buf))
        assert bytes(buf) == blob[:4096]
        m = ep.extent_handle(handles)
        assert (m is handles[0]) == (len(handles) == 1)
    finally:
        ep.close()
    ro = servers.start("qemu-nbd", read_only=True)
    with pytest.raises(CopyError, match="read-only"):
        NBDEndpoint(ro.uri(), connections=1, write=True, timeout=TIMEOUT)
    dst = servers.start("nbdkit-memory")
    ep = NBDEndpoint(dst.uri(), connections=1, write=True, timeout=TIMEOUT)
    try:
        (h,) = ep.open_handles(1)
        h.wait(h.submit_write(0, memoryview(b"\xff" * 8192)))
        h.wait(h.submit_zero(4096, 4096, allocated=True))
    finally:
        ep.close()
    with connect(dst.uri(), timeout=TIMEOUT) as c:
        assert c.read(0, 8192) == b"\xff" * 4096 + bytes(4096)
