"""Helpers for the backup tests: a ``pynbd serve`` with a control socket and bitmaps,
the pynbd CLI, and reading dirty bitmaps back with programs nobody here wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pynbd.server.control import control_request
from tests.support.images import make_image
from tests.support.processes import run_pynbd
from tests.support.pynbd_server import PynbdServer, free_unix_path

KiB = 1024
MiB = 1024 * KiB


def pynbd(*args: str, ok: bool = True, timeout: float = 300,
          input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    p = run_pynbd(*args, timeout=timeout, input=input, python=sys.executable)
    if ok:
        assert p.returncode == 0, (f"pynbd {' '.join(args)}: rc={p.returncode}\n"
                                   f"{p.stdout.decode(errors='replace')}\n"
                                   f"{p.stderr.decode(errors='replace')}")
    return p


def run(*cmd: str, ok: bool = True, timeout: float = 300,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       env=None if env is None else {**os.environ, **env})
    if ok:
        assert p.returncode == 0, f"{cmd}: rc={p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


class Served:
    """``pynbd serve --config`` of one file export with a control socket."""

    def __init__(self, tmp: Path, image: Path, *, name: str = "disk",
                 bitmaps: Sequence[str | dict[str, Any]] = (), workers: int | None = None,
                 extra: Sequence[str] = (), tag: str = "") -> None:
        self.tmp = tmp
        self.image = image
        self.name = name
        self.ctl = free_unix_path(tmp, f"ctl{tag}.sock")
        cfg = tmp / f"serve{tag}.toml"
        lines = ["[[export]]", f'name = "{name}"', f'target = "{image}"']
        if bitmaps:
            items = []
            for b in bitmaps:
                if isinstance(b, str):
                    items.append(json.dumps(b))
                else:
                    items.append("{" + ", ".join(f"{k} = {json.dumps(v)}"
                                                 for k, v in b.items()) + "}")
            lines.append(f"bitmaps = [{', '.join(items)}]")
        cfg.write_text("\n".join(lines) + "\n")
        args = ["-v", "--bind", "127.0.0.1", "--port", "0", "--control", self.ctl,
                "--config", str(cfg), *extra]
        if workers is not None:
            args = ["--workers", str(workers), *args]
        self.srv = PynbdServer(args, cwd=tmp)

    @property
    def base(self) -> str:
        return self.srv.uri_for("nbd://").rsplit("/", 1)[0]

    @property
    def uri(self) -> str:
        return f"{self.base}/{self.name}"

    @property
    def port(self) -> int:
        return self.srv.port

    def view_uri(self, checkpoint: str) -> str:
        return f"{self.base}/{self.name}@{checkpoint}"

    def control(self, req: dict[str, Any]) -> dict[str, Any]:
        reply = control_request(self.ctl, req)
        assert reply.get("ok"), reply
        return reply

    def status(self) -> dict[str, Any]:
        return self.control({"cmd": "status"})["status"]

    def export_status(self, name: str | None = None) -> dict[str, Any]:
        want = name or self.name
        for e in self.status()["exports"]:
            if e["name"] == want:
                return e
        raise AssertionError(f"no export {want} in status")

    def bitmap(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[bytes]:
        return pynbd("bitmap", "--control", self.ctl, *args, ok=ok)

    def checkpoint(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[bytes]:
        return pynbd("checkpoint", "--control", self.ctl, *args, ok=ok)

    def stop(self) -> None:
        self.srv.stop()

    def kill(self) -> None:
        """SIGKILL the supervisor (its workers finish and exit on their own)."""
        self.srv.proc.kill()
        self.srv.proc.wait(10)


# --- what the bitmap should say ---------------------------------------------------------

def expected_dirty(writes: Iterable[tuple[int, int]], granularity: int,
                   size: int) -> list[tuple[int, int]]:
    """The written ranges rounded out to the granularity, coalesced, clipped to size."""
    granules: set[int] = set()
    for off, ln in writes:
        if ln <= 0:
            continue
        granules.update(range(off // granularity, (off + ln + granularity - 1) // granularity))
    out: list[tuple[int, int]] = []
    for g in sorted(granules):
        start, end = g * granularity, min((g + 1) * granularity, size)
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], end - out[-1][0])
        else:
            out.append((start, end - start))
    return out


def runs(extents: Iterable[tuple[int, int, bool]]) -> list[tuple[int, int]]:
    """(offset, length, dirty) extents -> coalesced dirty runs."""
    out: list[tuple[int, int]] = []
    for off, ln, dirty in extents:
        if not dirty or ln <= 0:
            continue
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + ln)
        else:
            out.append((off, ln))
    return out


def covers(extents: Sequence[tuple[int, int, bool]], size: int) -> bool:
    pos = 0
    for off, ln, _ in extents:
        if off != pos:
            return False
        pos += ln
    return pos == size


def qemu_img_dirty(port: int, export: str, bitmap: str,
                   trixie_peer: bool = False) -> list[tuple[int, int, bool]]:
    """qemu-img map through the x-dirty-bitmap option: qemu reports dirty ranges as
    not-data (its NBD driver reads the bitmap in place of base:allocation)."""
    opts = (f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},"
            f"export={export},x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}")
    cmd = ["qemu-img", "map", "--output=json", "--image-opts", opts]
    if trixie_peer:
        from tests.support import trixie

        out = trixie.run(cmd).stdout
    else:
        out = run(*cmd).stdout
    return [(e["start"], e["length"], not e["data"]) for e in json.loads(out)]


def nbdinfo_dirty(uri: str, bitmap: str, trixie_peer: bool = False
                  ) -> list[tuple[int, int, bool]]:
    cmd = ["nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{bitmap}", uri]
    if trixie_peer:
        from tests.support import trixie

        out = trixie.run(cmd).stdout
    else:
        out = run(*cmd).stdout
    return [(e["offset"], e["length"], bool(e["type"] & 1)) for e in json.loads(out)]


def libnbd_dirty(uri: str, bitmap: str, size: int) -> tuple[list[tuple[int, int, bool]],
                                                            list[tuple[int, int, int]]]:
    """libnbd: base:allocation and the bitmap, asked in the same BLOCK_STATUS requests."""
    import nbd

    h = nbd.NBD()
    h.set_strict_mode(h.get_strict_mode())
    ctx = f"qemu:dirty-bitmap:{bitmap}"
    h.add_meta_context("base:allocation")
    h.add_meta_context(ctx)
    h.connect_uri(uri)
    try:
        assert h.can_meta_context(ctx) and h.can_meta_context("base:allocation")
        dirty: list[tuple[int, int, bool]] = []
        alloc: list[tuple[int, int, int]] = []
        pos = 0
        while pos < size:
            got: dict[str, list[int]] = {}

            def cb(meta: str, off: int, ents: list[int], err: int,
                   got: dict[str, list[int]] = got) -> int:
                got[meta] = list(ents)
                return 0

            h.block_status(min(size - pos, 1 << 30), pos, cb)
            assert set(got) == {ctx, "base:allocation"}, got.keys()
            p = pos
            ents = got[ctx]
            for i in range(0, len(ents), 2):
                dirty.append((p, ents[i], bool(ents[i + 1] & 1)))
                p += ents[i]
            q = pos
            ents2 = got["base:allocation"]
            for i in range(0, len(ents2), 2):
                alloc.append((q, ents2[i], ents2[i + 1]))
                q += ents2[i]
            pos = min(p, size)
        return dirty, alloc
    finally:
        h.shutdown()


def pynbd_dirty(uri: str, bitmap: str) -> list[tuple[int, int, bool]]:
    from pynbd.client import connect

    ctx = f"qemu:dirty-bitmap:{bitmap}"
    with connect(uri, meta_contexts=("base:allocation", ctx)) as c:
        return [(e.offset, e.length, bool(e.flags & 1))
                for e in c.iter_extents(0, c.size, context=ctx)]


def sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


# --- a small chain of backups of checkpoint views -----------------------------------

SIZE16 = 16 * MiB
STEPS = [
    [],
    ["write -P 0x31 1M 200k", "write -z 8M 1M"],
    ["write -P 0x32 1100k 4k", "discard 2M 64k", "write -P 0x33 15M 1M"],
    ["write -P 0x34 0 16M"],
    ["write -z 4M 8M", "write -P 0x35 5M 4k"],
]


def make_chain(tmp: Path, fmt: str, steps: list[list[str]] = STEPS) -> tuple[Path, list[bytes]]:
    """A chain of one full and len(steps)-1 incremental backups of checkpoint views of
    an image changed by qemu-io between them; the image at each checkpoint."""
    img = make_image(tmp / "disk.img", SIZE16, {off: 700 * 1024 for off in
                                              range(0, SIZE16, 2 * MiB)}, seed=21)
    chain = tmp / "chain"
    snaps: list[bytes] = []
    s = Served(tmp, img, workers=1)
    try:
        for i, cmds in enumerate(steps):
            if cmds:
                run("qemu-io", "-f", "raw", *[c for cmd in cmds for c in ("-c", cmd)], s.uri)
            s.checkpoint(f"c{i}")
            snaps.append(img.read_bytes())
            pynbd("backup", "--format", fmt, s.view_uri(f"c{i}"), str(chain))
            if i:
                s.checkpoint("--release", f"c{i - 1}")
    finally:
        s.stop()
    return chain, snaps
