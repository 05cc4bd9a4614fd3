"""The checksum of pieces handed in by several threads, in any interleaving."""

from __future__ import annotations

import hashlib
import os
import random
import threading

import pytest

from pynbd.copy.errors import CopyError
from pynbd.copy.hasher import OrderedHasher


def test_pieces_from_several_threads_hash_in_offset_order() -> None:
    rng = random.Random(7)
    pieces: list[tuple[int, bytes | None, int]] = []
    pos = 0
    for _ in range(300):
        n = rng.randrange(1, 50_000)
        pieces.append((pos, None if rng.random() < 0.3 else os.urandom(n), n))
        pos += n
    want = hashlib.sha256(b"".join(bytes(n) if d is None else d for _, d, n in pieces))
    h = OrderedHasher("sha256")
    # like the workers: piece i goes to thread i % 4, each thread in increasing order
    def run(k: int) -> None:
        for off, data, n in pieces[k::4]:
            h.update(off, None if data is None else memoryview(data), n)
    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert h.hexdigest() == want.hexdigest()


def test_abort_wakes_a_waiting_thread() -> None:
    h = OrderedHasher("sha256")
    errors: list[BaseException] = []

    def later() -> None:
        try:
            h.update(4096, memoryview(b"x"), 1)  # waits for offset 0, which never comes
        except CopyError as exc:
            errors.append(exc)
    t = threading.Thread(target=later)
    t.start()
    h.abort()
    t.join(30)
    assert not t.is_alive() and len(errors) == 1 and "aborted" in str(errors[0])


def test_a_piece_handed_in_twice_is_an_error() -> None:
    h = OrderedHasher("md5")
    h.update(0, memoryview(b"abc"), 3)
    with pytest.raises(CopyError, match="out of order"):
        h.update(0, memoryview(b"abc"), 3)
