"""Helpers shared by the filter tests (real peers only: libnbd, qemu-io, nbdcopy)."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import nbd

from tests.support.images import make_image
from tests.support.processes import run_pynbd

KiB = 1024
MiB = 1024 * KiB


def sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def strict(uri: str) -> nbd.NBD:
    """A libnbd handle in strict mode (every client-side check on), connected."""
    h = nbd.NBD()
    h.set_strict_mode(nbd.STRICT_MASK)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


def qemu_io(uri: str, *cmds: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    p = subprocess.run([*args, uri], capture_output=True, text=True, timeout=120)
    if check:
        out = p.stdout + p.stderr
        assert p.returncode == 0 and "fail" not in out.lower() and "error" not in out.lower(), out
    return p


def nbdcopy_to(uri: str, dest: Path) -> bytes:
    subprocess.run(["nbdcopy", uri, str(dest)], check=True, timeout=120,
                   capture_output=True)
    return dest.read_bytes()


def serve_fails(*args: str, cwd: str | os.PathLike[str] | None = None
                ) -> subprocess.CompletedProcess[str]:
    """Run ``pynbd serve ARGS`` that must refuse to start: exit status 2, one clear
    line on stderr, no traceback."""
    p = run_pynbd("serve", "--port", "0", "--workers", "1", *args, text=True, timeout=60,
                  cwd=cwd, python=sys.executable)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("pynbd serve: "), p.stderr
    return p


def _collect(got: list[tuple[int, int]]):  # type: ignore[no-untyped-def]
    def cb(meta: str, off: int, entries: list[int], err: int) -> int:
        if meta == nbd.CONTEXT_BASE_ALLOCATION:
            got.extend(zip(entries[::2], entries[1::2], strict=True))
        return 0
    return cb


def block_status(h: nbd.NBD, offset: int, length: int) -> list[tuple[int, int]]:
    """base:allocation (length, flags) pairs from ``offset`` (merged, up to ``length``)."""
    out: list[tuple[int, int]] = []
    pos = offset
    end = offset + length
    for _ in range(10000):
        if pos >= end:
            break
        got: list[tuple[int, int]] = []

        h.block_status(end - pos, pos, _collect(got))
        for n, flags in got:
            n = min(n, end - pos)
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + n, flags)
            else:
                out.append((n, flags))
            pos += n
            if pos >= end:
                break
    return out


def flags_at(extents: list[tuple[int, int]], offset: int, start: int = 0) -> int:
    """The flags of the extent holding byte ``offset`` (extents begin at ``start``)."""
    pos = start
    for n, flags in extents:
        if pos <= offset < pos + n:
            return flags
        pos += n
    raise AssertionError(f"offset {offset} not covered by {extents}")


def make_base(path: Path, size: int, seed: int = 1) -> bytes:
    """A base image of random data (every byte written); its content."""
    return make_image(path, size, fill=True, seed=seed).read_bytes()


def read_all(h: nbd.NBD, size: int) -> bytes:
    out = bytearray()
    step = 4 * MiB
    for off in range(0, size, step):
        out += h.pread(min(step, size - off), off)
    return bytes(out)


def concurrent_partial_writes(uri: str, model: bytearray, nconn: int, first_block: int,
                               nblocks: int, bs: int, seed: int) -> None:
    """``nconn`` connections write disjoint, unaligned slices of the same new blocks at
    once (asynchronously, every block in flight): each block is copied up by whichever
    write comes first, and no other write may be lost to that copy."""
    handles = [strict(uri) for _ in range(nconn)]
    rng = random.Random(seed)
    part = bs // nconn
    plans: list[list[tuple[int, bytes]]] = []
    for i in range(nconn):
        plan = []
        for b in range(first_block, first_block + nblocks):
            off = b * bs + i * part + 1  # leave a base byte either side of each slice
            data = rng.randbytes(part - 2)
            plan.append((off, data))
            model[off:off + len(data)] = data
        rng.shuffle(plan)
        plans.append(plan)
    barrier = threading.Barrier(nconn)
    errors: list[BaseException] = []

    def run(h: nbd.NBD, plan: list[tuple[int, bytes]]) -> None:
        try:
            barrier.wait(30)
            cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off)
                       for off, data in plan]
            for _ in range(100000):
                if h.aio_in_flight() == 0:
                    break
                h.poll(1000)
            for cookie in cookies:  # raises if the write failed
                assert h.aio_command_completed(cookie)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(h, p)) for h, p in zip(handles, plans,
                                                                          strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for h in handles:
        h.shutdown()
