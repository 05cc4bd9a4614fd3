"""The copy engine in-process: how the workers move the data, and what a copy between
files leaves behind. (``pynbd copy`` as a program is tested in tests/cli.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pynbd.client import connect
from pynbd.copy import CopyError, Options, copy, digest_of
from pynbd.copy.worker import Worker
from tests.client.conftest import IMAGE_SIZE, TIMEOUT, Servers, expected_image
from tests.support.images import make_image

MiB = 1 << 20


def test_zero_copy_is_chosen_when_possible(servers: Servers, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Which workers forward without buffers (no checksum, no TLS, an NBD destination)
    and which buffer the data."""
    used: list[bool] = []
    real = Worker.run

    def run(self: Worker) -> None:
        used.append(self.forward)
        real(self)
    monkeypatch.setattr(Worker, "run", run)
    src = servers.start("qemu-nbd", "unix")
    dst = servers.start("nbdkit-memory", "unix")
    img = tmp_path / "img"
    img.write_bytes(bytes(expected_image()))
    cases: list[tuple[str, str, Options, bool]] = [
        (src.uri(), dst.uri(), Options(connections=2, threads=2), True),
        (str(img), dst.uri(), Options(connections=1), True),
        (src.uri(), dst.uri(), Options(connections=1, checksum="sha256"), False),
        (src.uri(), dst.uri(), Options(connections=1, zero_copy=False), False),
        (src.uri(), str(tmp_path / "out"), Options(connections=1), False),
    ]
    for s_uri, d_uri, opts, forward in cases:
        used.clear()
        total, _ = copy(s_uri, d_uri, opts, timeout=TIMEOUT)
        assert total == IMAGE_SIZE
        assert used and all(u == forward for u in used), (s_uri, d_uri, opts)
    assert (tmp_path / "out").read_bytes() == expected_image()
    with connect(dst.uri(), timeout=TIMEOUT) as c:
        assert c.read(0, IMAGE_SIZE) == expected_image()


def _image(path: Path) -> bytes:
    """A sparse file: data, a 5 MiB hole, data, a 2 MiB hole at the end; its content."""
    return make_image(path, 11 * MiB + 123, {0: MiB + 123, 6 * MiB + 123: 3 * MiB}
                      ).read_bytes()


@pytest.mark.parametrize("split", [True, False], ids=["reader+writer", "one-thread"])
@pytest.mark.parametrize("threads", [1, 3])
def test_file_to_file(tmp_path: Path, split: bool, threads: int) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    blob = _image(src)
    dst.write_bytes(b"old" * 5_000_000)  # longer than the source: replaced, like cp
    opts = Options(connections=threads, threads=threads, requests=3, request_size=256 << 10,
                   checksum="sha256", split_threads=split)
    total, digest = copy(str(src), str(dst), opts)
    assert total == len(blob)
    assert dst.read_bytes() == blob
    assert os.stat(dst).st_blocks * 512 < len(blob) // 2  # the holes stayed holes
    assert digest == digest_of(str(dst), "sha256", total, None)
    # --allocated: the zero ranges are written
    total, _ = copy(str(src), str(dst), Options(allocated=True, split_threads=split))
    assert dst.read_bytes() == blob
    assert os.stat(dst).st_blocks * 512 >= len(blob)


def test_file_writes_that_make_no_progress_fail(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that moves no bytes is an error, not success after a bounded number of
    tries (the loop used to give up silently and report the copy as done)."""
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    blob = os.urandom(2 * MiB)
    src.write_bytes(blob)
    calls = 0

    def stuck(fd: int, buffers: list[memoryview], offset: int) -> int:
        nonlocal calls
        calls += 1
        return 0
    monkeypatch.setattr(os, "pwritev", stuck)
    for split in (True, False):
        with pytest.raises(CopyError, match="made no progress"):
            copy(str(src), str(dst), Options(connections=1, split_threads=split))
    assert calls == 2  # stopped at once each time, not after a million tries


def test_short_file_writes_are_completed(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """pwrite may write less than asked: the rest is written, at the right offsets."""
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    blob = _image(src)
    real = os.pwritev
    sizes: list[int] = []

    def short(fd: int, buffers: list[memoryview], offset: int) -> int:
        part = memoryview(buffers[0])[:100_000]
        sizes.append(len(part))
        return real(fd, [part], offset)
    monkeypatch.setattr(os, "pwritev", short)
    total, _ = copy(str(src), str(dst), Options(allocated=True))
    assert total == len(blob) and dst.read_bytes() == blob
    assert max(sizes) == 100_000 and len(sizes) > len(blob) // 100_000


def test_destination_smaller_than_source(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(MiB))
    with pytest.raises(CopyError, match="smaller"):
        copy(str(src), "/dev/null", Options())  # a character device of size 0


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        copy(str(tmp_path / "missing"), str(tmp_path / "out"), Options())
    assert not (tmp_path / "out").exists()
