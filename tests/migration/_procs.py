"""Helpers for the migration and proxy tests: the processes (tests/support/migration.py,
re-exported here), the CLI, the migration status, images and how to compare them."""

from __future__ import annotations

import contextlib
import random
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pynbd.server.control import control_request
from tests.support.images import make_image
from tests.support.migration import Procs, Writer, listen
from tests.support.processes import Process, run_pynbd

__all__ = ["BLOCK", "Procs", "Writer", "compare_images", "ctl", "listen",
           "make_sparse_image", "migration_status", "poll_until_exit", "run_cli",
           "sparse_file", "stepped_down_error"]

BLOCK = 64 * 1024


def run_cli(args: Sequence[str], timeout: float = 120.0,
            stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return run_pynbd(*args, input=stdin, timeout=timeout)


def ctl(path: str, req: dict[str, Any]) -> dict[str, Any]:
    return control_request(path, req, timeout=30.0)


def migration_status(path: str) -> dict[str, Any]:
    reply = ctl(path, {"cmd": "status"})
    assert reply["ok"], reply
    m: dict[str, Any] = reply["status"]["migration"]
    return m


def make_sparse_image(path: Path, size: int, seed: int, fraction: float = 0.25) -> None:
    """A sparse image with random-data extents covering about ``fraction`` of it."""
    rng = random.Random(seed)
    extents: list[tuple[int, bytes]] = []
    allocated = 0
    while allocated < size * fraction:
        n = rng.randrange(1, 64) * BLOCK
        off = rng.randrange(0, (size - n) // 4096) * 4096
        extents.append((off, rng.randbytes(n)))
        allocated += n
    make_image(path, size, extents)


def compare_images(a: Path, b: Path, block: int = BLOCK) -> list[int]:
    """Offsets of the blocks that differ (block by block)."""
    bad = []
    with open(a, "rb") as fa, open(b, "rb") as fb:
        off = 0
        while True:
            x = fa.read(block)
            y = fb.read(block)
            if not x and not y:
                break
            if x != y:
                bad.append(off)
            off += block
    return bad


def stepped_down_error(exc: BaseException | None) -> bool:
    """None, or the error a writer sees when its server stepped down (ESHUTDOWN, then
    the connection is dropped)."""
    if exc is None:
        return True
    text = repr(exc)
    return "ESHUTDOWN" in text or "stepped down" in text or isinstance(
        exc, (ConnectionError, EOFError)) or "closed" in text.lower()


def sparse_file(path: Path, size: int) -> None:
    """An image with nothing written (all holes)."""
    make_image(path, size)


def poll_until_exit(proc: Process, ctl_path: str, timeout: float = 120.0) -> list[dict[str, Any]]:
    """Poll the source's migration status until ``proc`` exits; every sample."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while proc.proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            seen.append(migration_status(ctl_path))
        time.sleep(0.05)
    return seen
