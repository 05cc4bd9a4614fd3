"""The shared test helpers themselves: free ports, images, the process launcher."""

from __future__ import annotations

import os
import random
import signal
import socket
import sys
from pathlib import Path

import pytest

import pynbd
from tests.support.images import MiB, make_image, randbytes
from tests.support.net import free_port, listening_socket, port_open
from tests.support.processes import Process, pynbd_argv, pynbd_env, run_pynbd


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


# --- ports ------------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_free_port_can_be_bound(host: str) -> None:
    port = free_port(host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, port))
    assert not port_open(host, port)


def test_listening_socket_accepts() -> None:
    s, port = listening_socket()
    with s:
        assert port_open("127.0.0.1", port)


# --- images -----------------------------------------------------------------------------

def _data_ranges(path: Path) -> list[tuple[int, int]]:
    """(start, end) of the allocated ranges (SEEK_DATA/SEEK_HOLE)."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return out


def test_image_extents_bytes_and_seeded_random(tmp_path: Path) -> None:
    p = make_image(tmp_path / "a.img", 8 * MiB, {MiB: b"boot", 4 * MiB: MiB}, seed=7)
    data = p.read_bytes()
    assert len(data) == 8 * MiB
    assert data[MiB:MiB + 4] == b"boot"
    assert data[4 * MiB:5 * MiB] == random.Random(7).randbytes(MiB)
    assert data.count(0) >= 6 * MiB  # the rest reads as zeros
    ranges = _data_ranges(p)

    def allocated(off: int) -> bool:
        return any(s <= off < e for s, e in ranges)

    assert allocated(MiB) and allocated(4 * MiB) and allocated(5 * MiB - 1), ranges
    assert not allocated(0) and not allocated(6 * MiB), ranges  # holes stay holes
    # the same seed, the same image; one random stream across the extents
    again = make_image(tmp_path / "b.img", 8 * MiB, [(0, 100), (MiB, 200)], seed=7)
    rnd = random.Random(7)
    first, second = rnd.randbytes(100), rnd.randbytes(200)
    assert again.read_bytes()[:100] == first and again.read_bytes()[MiB:MiB + 200] == second


def test_image_without_seed_is_fresh_random(tmp_path: Path) -> None:
    a = make_image(tmp_path / "a.img", MiB, {0: 4096}).read_bytes()
    b = make_image(tmp_path / "b.img", MiB, {0: 4096}).read_bytes()
    assert a[:4096] != b[:4096] and a[4096:] == bytes(MiB - 4096)


def test_image_fill_streams_the_seeded_bytes(tmp_path: Path) -> None:
    size = 3 * MiB + 1001  # several chunks and a short, odd last one
    p = make_image(tmp_path / "f.img", size, fill=True, seed=3)
    assert p.read_bytes() == random.Random(3).randbytes(size)
    assert randbytes(10, seed=3) == random.Random(3).randbytes(10)


def test_image_not_sparse_allocates_everything(tmp_path: Path) -> None:
    p = make_image(tmp_path / "full.img", 4 * MiB, {MiB: b"x"}, sparse=False, sync=True)
    assert _data_ranges(p) == [(0, 4 * MiB)]
    assert p.read_bytes() == bytes(MiB) + b"x" + bytes(3 * MiB - 1)


@pytest.mark.parametrize("extent", [(-1, b"x"), (MiB - 1, b"xy"), (MiB, 1)])
def test_image_extent_outside_is_an_error(tmp_path: Path, extent: tuple[int, object]) -> None:
    with pytest.raises(ValueError, match="outside"):
        make_image(tmp_path / "bad.img", MiB, [extent])  # type: ignore[list-item]


# --- processes ----------------------------------------------------------------------------

def test_process_lines_output_and_exit_status() -> None:
    p = Process(_py("import sys\nprint('one', flush=True)\nprint('two')\n"
                    "sys.stdout.write('partial')\nsys.stderr.write('oops\\n')\nsys.exit(3)"),
                name="lines")
    assert p.first_line() == "one"
    assert p.wait(60) == 3
    assert p.lines() == ["one", "two", "partial"]  # complete once it has exited
    assert p.stderr == "oops\n" and "oops" in p.logs() and p.output.endswith("oops\n")
    assert p.stop() == 3


def test_process_wait_for_fails_when_it_exits_first() -> None:
    p = Process(_py("import sys; sys.stderr.write('no such thing'); sys.exit(2)"), name="gone")
    with pytest.raises(RuntimeError, match=r"(?s)gone exited \(2\) before the marker.*no such"):
        p.wait_for(lambda: False, "the marker", timeout=60)


def test_process_stop_escalates_to_sigkill() -> None:
    p = Process(_py("import signal, sys, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                    "print('ready', flush=True)\nwhile True: time.sleep(1)"),
                name="stubborn", stop_timeout=1.0)
    p.first_line()
    assert p.stop() == -signal.SIGKILL
    assert not p.alive()


def test_process_sigterm_and_log_files(tmp_path: Path) -> None:
    code = "import time\nprint('up', flush=True)\ntime.sleep(600)"
    a = Process(_py(code), name="srv", log_dir=tmp_path)
    b = Process(_py(code), name="srv", log_dir=tmp_path)  # never overwrites a's output
    assert a.first_line() == "up" and b.first_line() == "up"
    assert a.stop() == -signal.SIGTERM and b.stop() == -signal.SIGTERM
    assert (tmp_path / "srv.out").read_text() == "up\n"
    assert (tmp_path / "srv-2.out").read_text() == "up\n"


def test_pynbd_runs_from_this_checkout() -> None:
    src = str(Path(__file__).resolve().parents[2] / "src")
    assert pynbd_env()["PYTHONPATH"].split(os.pathsep)[0] == src
    assert pynbd_env({"X": "1"}, pythonpath=["/p"])["PYTHONPATH"].split(os.pathsep)[:2] == \
        [src, "/p"]
    r = run_pynbd("--version", text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"pynbd {pynbd.__version__}"
    p = Process(pynbd_argv("serve", "--port", "0", "memory:1M"), name="serve")
    try:
        uri = p.first_line()
        assert uri.startswith("nbd://")
    finally:
        assert p.stop() == 0, p.stderr
