"""Migration over plain NBD into qemu-nbd and nbdkit while a writer writes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.migration._procs import (
    Procs,
    Writer,
    compare_images,
    make_sparse_image,
    migration_status,
    run_cli,
    sparse_file,
    stepped_down_error,
)

#: a 1 GiB sparse export, about 64 MiB of it allocated
SIZE = 1024 * 1024 * 1024
FIELDS = {"state", "bytes_done", "bytes_left", "dirty_bytes", "speed_bytes_per_second",
          "elapsed_seconds", "eta_seconds", "speed_limit_bytes_per_second", "attempts",
          "epoch", "authoritative"}


@pytest.mark.parametrize("target", ["qemu-nbd", "nbdkit"])
def test_migrate_to_plain_nbd_while_writing(procs: Procs, tmp_path: Path, target: str) -> None:
    src = tmp_path / "src.img"
    dst = tmp_path / "dst.img"
    make_sparse_image(src, SIZE, seed=1, fraction=1 / 16)
    sparse_file(dst, SIZE)
    _p, uri, ctl = procs.serve(src)
    _d, dst_uri = procs.qemu_nbd(dst) if target == "qemu-nbd" else procs.nbdkit(dst)
    writer = Writer(uri, SIZE, seed=2, rate=4 * 1024 * 1024)
    writer.start()
    time.sleep(0.3)
    mirror = procs.pynbd(["mirror", "--control", ctl, "--to", dst_uri,
                          "--wait", "--json", "--max-speed", "24M"], "mirror")
    seen = []
    for _ in range(3000):
        st = migration_status(ctl)
        assert FIELDS <= set(st), st
        seen.append(st["state"])
        if mirror.proc.poll() is not None:
            break
        time.sleep(0.02)
    assert mirror.proc.wait(60) == 0, mirror.logs()
    final = json.loads(mirror.stdout)
    assert final["result"] == "completed"
    assert final["bytes_left"] == 0
    writer.stop_event.set()
    writer.join(10)
    assert writer.writes > 0
    # the writer is refused once the source stepped down, never before
    assert stepped_down_error(writer.error), writer.error
    st = migration_status(ctl)
    assert st["authoritative"] is False and st["state"] == "completed"
    assert "copying" in seen
    _d.stop()
    assert compare_images(src, dst) == [], final
    assert writer.check_in(dst) == []
    # the source refuses further I/O
    r = run_cli(["read", uri, "--from", "0", "--size", "4096"])
    assert r.returncode != 0


def test_destination_restart_loses_no_acknowledged_write(procs: Procs, tmp_path: Path) -> None:
    """nbdkit with a writeback cache (an acknowledged write reaches the file only on
    FLUSH, as with a disk's volatile cache) is killed in the middle of the copy and
    started again: the mirror sends again every write no FLUSH covered, and the
    destination ends equal to the source. (It used to re-send only the writes without a
    reply and report "completed" with megabytes missing.)"""
    import os
    import shutil
    import signal

    size = 32 * 1024 * 1024
    src = tmp_path / "src.img"
    dst = tmp_path / "dst.img"
    src.write_bytes(os.urandom(size))
    sparse_file(dst, size)
    sock = str(tmp_path / "wb.sock")
    argv = [shutil.which("nbdkit") or "nbdkit", "-f", "-U", sock, "--filter", "cache",
            "file", f"file={dst}", "cache=writeback"]

    def start_dest(name: str) -> str:
        p = procs.start(argv, name)
        p.wait_for(lambda: os.path.exists(sock), "socket")
        return f"nbd+unix:///?socket={sock}"

    dst_uri = start_dest("nbdkit-wb")
    _p, _uri, ctl = procs.serve(src)
    mirror = procs.pynbd(["mirror", "--control", ctl, "--to", dst_uri, "--wait", "--json",
                          "--max-speed", "4M", "--max-attempts", "10"], "mirror")
    deadline = time.monotonic() + 60
    while migration_status(ctl)["bytes_done"] == 0:
        assert mirror.proc.poll() is None, mirror.logs()
        if time.monotonic() >= deadline:  # a hang guard, not a speed check
            pytest.fail("the copy did not start within 60 s")
        time.sleep(0.05)
    time.sleep(2)  # more of the copy acknowledged (4 MiB/s), none of it flushed
    assert mirror.proc.poll() is None, mirror.logs()
    dest = procs.all[0]
    os.kill(dest.proc.pid, signal.SIGKILL)
    dest.proc.wait(10)
    os.unlink(sock)
    start_dest("nbdkit-wb2")
    assert mirror.proc.wait(120) == 0, mirror.logs()
    final = json.loads(mirror.stdout)
    assert final["result"] == "completed" and final["attempts"] >= 2, final
    assert compare_images(src, dst) == [], final
