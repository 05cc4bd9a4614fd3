"""SIGKILL the source or the destination at each handover step, restart it, and check
that exactly one copy is authoritative and that it holds every acknowledged write."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.migration._procs import (
    Procs,
    Writer,
    compare_images,
    listen,
    make_sparse_image,
    migration_status,
    sparse_file,
    stepped_down_error,
)

SIZE = 32 * 1024 * 1024

# (halt step, which process halts there and is killed)
CASES = [
    ("source:before-commit", "source"),
    ("source:commit-sent", "source"),
    ("dest:commit-received", "dest"),
    ("dest:durable", "dest"),
    ("source:acked", "source"),
    ("dest:replied", "dest"),
]


def _settled(st: dict[str, Any]) -> bool:
    return st["state"] in ("completed", "idle", "authoritative", "receiving", "stepped-down")


@pytest.mark.parametrize(("step", "victim"), CASES)
def test_kill_at_handover_step(procs: Procs, tmp_path: Path, step: str, victim: str) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_sparse_image(src, SIZE, seed=21)
    sparse_file(dst, SIZE)
    marker = tmp_path / "halted"
    halt_env = {"PYNBD_MIGRATION_HALT_AT": step, "PYNBD_MIGRATION_HALT_FILE": str(marker)}
    s1, uri, ctl = procs.serve(src, env=halt_env if victim == "source" else None)
    d1, m2, dctl, _ = listen(procs, dst, name="dest1",
                             env=halt_env if victim == "dest" else None)
    port = m2.rsplit(":", 1)[1]
    w = Writer(uri, SIZE, seed=22, rate=2 * 1024 * 1024)
    w.start()
    time.sleep(0.2)
    mirror = procs.mirror(["--control", ctl, "--to", m2, "--wait",
                           "--max-attempts", "30"], "mirror")
    d1.wait_for(marker.exists, f"halt at {step}", timeout=60)
    (s1 if victim == "source" else d1).kill(signal.SIGKILL)
    (s1 if victim == "source" else d1).proc.wait(10)
    # (the writer may be paused by the source: stop it, join it once resolved)
    w.stop_event.set()
    # restart the killed side with the same addresses, without the halt
    if victim == "source":
        mirror.kill()
        for p in (tmp_path / "source.sock", tmp_path / "source.ctl"):
            if p.exists():
                os.unlink(p)
        _s2, _uri2, ctl = procs.serve(src, name="source")
    else:
        d2 = procs.pynbd(["listen", str(dst), *procs.auth(), "--bind", "127.0.0.1", "--port", port,
                          "--control", str(tmp_path / "dest2.ctl")], "dest2")
        d2.first_line()
        d2.wait_for(lambda: (tmp_path / "dest2.ctl").exists(), "control socket")
        dctl = str(tmp_path / "dest2.ctl")
        assert mirror.proc.wait(120) in (0, 14), mirror.logs()
    s = d = {}
    for _ in range(600):
        s, d = migration_status(ctl), migration_status(dctl)
        if _settled(s) and _settled(d) and s["authoritative"] != d["authoritative"]:
            break
        time.sleep(0.1)
    assert s["authoritative"] != d["authoritative"], (s, d)
    w.join(30)
    assert not w.is_alive()
    owner = src if s["authoritative"] else dst
    assert w.check_in(owner) == []
    if step == "source:before-commit":
        assert s["authoritative"] and d["state"] == "receiving"
    elif step == "dest:commit-received":
        # the destination never committed epoch 1: it refuses it for good; the mirror
        # (still running) went on and committed a later epoch
        assert 1 in d["aborted_epochs"]
    else:
        assert d["authoritative"] and d["epoch"] == 1 and s["state"] == "completed"
    if d["authoritative"]:
        assert compare_images(src, dst) == []


def test_in_doubt_keeps_clients_paused_until_destination_answers(procs: Procs,
                                                                 tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_sparse_image(src, SIZE, seed=23)
    sparse_file(dst, SIZE)
    marker = tmp_path / "halted"
    _s, uri, ctl = procs.serve(src)
    d1, m2, _dctl, _ = listen(procs, dst, name="dest1", env={
        "PYNBD_MIGRATION_HALT_AT": "dest:durable", "PYNBD_MIGRATION_HALT_FILE": str(marker)})
    port = m2.rsplit(":", 1)[1]
    w = Writer(uri, SIZE, seed=24, rate=1 << 20)
    w.start()
    mirror = procs.mirror(["--control", ctl, "--to", m2, "--wait",
                           "--max-attempts", "2"], "mirror")
    d1.wait_for(marker.exists, "halt at dest:durable", timeout=60)
    d1.kill(signal.SIGKILL)
    d1.proc.wait(10)
    # nobody answers: after --max-attempts queries the mirror reports "in doubt" (14)
    assert mirror.proc.wait(60) == 14, mirror.logs()
    st = migration_status(ctl)
    assert st["state"] == "in-doubt" and st["authoritative"] is False and st["paused"]
    writes = w.writes
    time.sleep(0.5)
    assert w.writes == writes and w.error is None  # paused, not failed, not resumed
    d2 = procs.pynbd(["listen", str(dst), *procs.auth(), "--bind", "127.0.0.1", "--port", port,
                      "--control", str(tmp_path / "dest2.ctl")], "dest2")
    d2.first_line()
    d2.wait_for(lambda: (tmp_path / "dest2.ctl").exists(), "control socket")
    for _ in range(300):
        st = migration_status(ctl)
        if st["state"] == "completed":
            break
        time.sleep(0.1)
    assert st["state"] == "completed" and st["authoritative"] is False
    assert migration_status(str(tmp_path / "dest2.ctl"))["authoritative"] is True
    w.stop_event.set()
    w.join(30)
    assert "ESHUTDOWN" in repr(w.error) or stepped_down_error(w.error)
    assert w.check_in(dst) == []
    assert compare_images(src, dst) == []


def test_restarted_source_without_control_socket_resolves_in_doubt(procs: Procs,
                                                                    tmp_path: Path) -> None:
    """A source killed after sending COMMIT and restarted *without* --control still asks
    the destination: its clients wait (paused), then are refused (ESHUTDOWN), because the
    destination committed. No operator action is needed."""
    from pynbd.client import connect

    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_sparse_image(src, SIZE, seed=25)
    sparse_file(dst, SIZE)
    marker = tmp_path / "halted"
    s1, _uri, ctl = procs.serve(src, env={"PYNBD_MIGRATION_HALT_AT": "source:commit-sent",
                                          "PYNBD_MIGRATION_HALT_FILE": str(marker)})
    _d, m2, dctl, _ = listen(procs, dst)
    mirror = procs.mirror(["--control", ctl, "--to", m2, "--wait"],
                           "mirror")
    s1.wait_for(marker.exists, "halt at source:commit-sent", timeout=60)
    s1.kill(signal.SIGKILL)
    s1.proc.wait(10)
    mirror.kill()
    sock = tmp_path / "again.sock"
    s2 = procs.pynbd(["serve", str(src), "--socket", str(sock)], "again")
    uri = s2.first_line()
    c = connect(uri, timeout=30.0)
    err: BaseException | None = None
    try:
        c.write(0, b"x" * 4096)  # held while in doubt, then refused: the destination owns it
    except BaseException as exc:
        err = exc
    finally:
        c.hard_close()
    assert err is not None and stepped_down_error(err), err
    assert migration_status(dctl)["authoritative"] is True
    assert "epoch 1 committed: stepping down" in s2.logs(), s2.logs()
    assert compare_images(src, dst) == []
