"""Helpers shared by the filter tests (real peers only: libnbd, qemu-io, nbdcopy)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import nbd

from tests.support.pynbd_server import REPO


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
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + (os.pathsep + env["PYTHONPATH"]
                                             if env.get("PYTHONPATH") else "")
    p = subprocess.run([sys.executable, "-m", "pynbd", "serve", "--port", "0", "--workers",
                        "1", *args], capture_output=True, text=True, timeout=60, cwd=cwd,
                       env=env, stdin=subprocess.DEVNULL)
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
