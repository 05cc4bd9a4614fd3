"""How a copy is cut into requests, and handed to several workers."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from pynbd.copy.endpoints import Extent, Handle
from pynbd.copy.workqueue import ZERO_CHUNK, WorkQueue, pieces

K = 1024


def test_pieces_align_data_and_keep_zero_ranges_large() -> None:
    got = list(pieces(iter([(0, 100 * K, False), (100 * K, 300 * K, True),
                            (400 * K, 300 * K, False)]), 128 * K))
    assert got == [
        (0, 100 * K, False),
        (100 * K, 300 * K, True),  # one zero piece (up to ZERO_CHUNK)
        # data after an unaligned start: first up to the next multiple of 128K
        (400 * K, 112 * K, False), (512 * K, 128 * K, False), (640 * K, 60 * K, False),
    ]


def test_zero_ranges_are_cut_at_zero_chunk() -> None:
    size = 2 * ZERO_CHUNK + 5
    got = list(pieces(iter([(0, size, True)]), 1 << 20))
    assert got == [(0, ZERO_CHUNK, True), (ZERO_CHUNK, ZERO_CHUNK, True),
                   (2 * ZERO_CHUNK, 5, True)]


class _Map(Handle):
    def __init__(self, extents: list[Extent]) -> None:
        super().__init__("map")
        self.calls = 0
        self._extents = extents

    def extents(self, offset: int, length: int) -> Iterator[Extent]:
        self.calls += 1
        yield from self._extents


def test_queue_hands_out_every_piece_once_to_many_threads() -> None:
    extents = [(i * 3 * K, 3 * K, i % 3 == 0) for i in range(2000)]
    h = _Map(extents)
    q = WorkQueue(h, 2000 * 3 * K, K)
    got: list[Extent] = []
    lock = threading.Lock()

    def worker() -> None:
        while (item := q.next()) is not None:
            with lock:
                got.append(item)
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(got) == list(pieces(iter(extents), K))
    assert h.calls == 1 and q.next() is None
