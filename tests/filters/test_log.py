"""The log filter: a line per request (libnbd, qemu-io), to a file or the server's log,
from several worker processes at once, failed requests with their errno, no log
injection from plugin error text, bad parameters."""

from __future__ import annotations

import re
from pathlib import Path

import nbd
import pytest

from tests.filters.ops_support import (
    connect,
    no_traceback,
    ops_serve,
    qemu_io,
    serve_refused,
)
from tests.support.pynbd_server import PynbdServer, wait_until

__all__ = ["ops_serve"]

LINE = re.compile(
    r"(?P<date>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}) pid=(?P<pid>\d+) conn=(?P<conn>\d+) "
    r"(?:(?P<event>connect|disconnect)(?P<rest>.*)"
    r"|id=(?P<id>\d+) op=(?P<op>\w+) offset=(?P<offset>0x[0-9a-f]+) length=(?P<length>\d+) "
    r"flags=(?P<flags>[\w|-]+) (?P<result>result=\w+)(?P<detail>.*) "
    r"elapsed=(?P<elapsed>\d+\.\d{6}))")


def parse(path: Path) -> list[re.Match[str]]:
    lines = path.read_text().splitlines()
    out = []
    for line in lines:
        m = LINE.fullmatch(line)
        assert m, f"malformed log line: {line!r}"
        out.append(m)
    return out


def requests(lines: list[re.Match[str]]) -> list[tuple[str, int, int, str, str]]:
    return [(m["op"], int(m["offset"], 16), int(m["length"]), m["flags"], m["result"])
            for m in lines if m["op"]]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_line_per_request_to_a_file(ops_serve, tmp_path: Path, workers: str) -> None:
    log = tmp_path / "requests.log"
    s = ops_serve("--workers", workers, "memory:8M", "--filter", f"log:file={log}")
    h = connect(s.uri)
    h.pwrite(b"a" * 4096, 0x10000, nbd.CMD_FLAG_FUA)
    assert h.pread(4096, 0x10000) == b"a" * 4096
    h.trim(8192, 0x20000)
    h.zero(65536, 0x40000, nbd.CMD_FLAG_NO_HOLE)
    h.flush()
    h.shutdown()
    assert wait_until(lambda: "disconnect" in log.read_text(), 10)
    lines = parse(log)
    assert lines[0]["event"] == "connect" and "export=''" in lines[0]["rest"]
    assert "read_only=no" in lines[0]["rest"]
    assert lines[-1]["event"] == "disconnect"
    assert len({m["conn"] for m in lines}) == 1 and len({m["pid"] for m in lines}) == 1
    got = requests(lines)
    assert got[:5] == [
        ("write", 0x10000, 4096, "fua", "result=ok"),
        ("read", 0x10000, 4096, "-", "result=ok"),
        ("trim", 0x20000, 8192, "-", "result=ok"),
        ("zero", 0x40000, 65536, "no_hole", "result=ok"),
        ("flush", 0, 0, "-", "result=ok"),
    ]
    # then the server's own flush when a client that wrote goes away
    assert got[5:] == [("flush", 0, 0, "-", "result=ok")]
    ids = [int(m["id"]) for m in lines if m["id"]]
    assert ids == list(range(1, len(ids) + 1))
    assert all(float(m["elapsed"]) >= 0 for m in lines if m["elapsed"])


def test_failed_requests_are_logged_with_their_errno(ops_serve, tmp_path: Path) -> None:
    log = tmp_path / "requests.log"
    s = ops_serve("--workers", "1", "memory:8M", "--filter", f"log:file={log}",
                  "--filter", "error:ops=write,error=ENOSPC")
    q = qemu_io(s.uri, "write -P 0x33 0 64k", "read 0 4k")
    assert "write failed: No space left on device" in q.stdout + q.stderr
    assert wait_until(lambda: "disconnect" in log.read_text(), 10)
    got = requests(parse(log))
    # qemu-io writes through (FUA) by default
    assert ("write", 0, 65536, "fua", "result=error") in got
    assert ("read", 0, 4096, "-", "result=ok") in got
    text = log.read_text()
    assert "errno=ENOSPC message='No space left on device (injected by the error filter)'" \
        in text


def test_worker_processes_append_whole_lines(ops_serve, tmp_path: Path) -> None:
    """Two connections on two worker processes write 300 requests each into one file:
    every line is whole, every request is there."""
    log = tmp_path / "requests.log"
    s = ops_serve("--workers", "2", "memory:8M", "--filter", f"log:file={log}")
    a = connect(s.uri)
    b = connect(s.uri)
    assert {c["worker"] for c in s.status()["client_list"]} == {0, 1}
    buf = nbd.Buffer.from_bytearray(bytearray(b"p" * 512))
    for h in (a, b):
        for i in range(300):
            h.aio_pwrite(buf, i * 512, lambda err: 1)  # retired automatically
    for h in (a, b):
        for _ in range(6000):
            if h.aio_in_flight() == 0:
                break
            h.poll(100)
        assert h.aio_in_flight() == 0
        h.shutdown()
    assert wait_until(lambda: log.read_text().count("disconnect") == 2, 10)
    lines = parse(log)
    writes = [m for m in lines if m["op"] == "write"]
    assert len(writes) == 600
    assert len({m["pid"] for m in writes}) == 2
    by_conn = {(m["pid"], m["conn"]) for m in writes}
    assert len(by_conn) == 2


def test_without_file_lines_go_to_the_server_log(tmp_path: Path) -> None:
    """No -v: the server's own per-connection chatter is off, the log filter's lines
    (asked for explicitly) are not, in worker processes too."""
    srv = PynbdServer(["--bind", "127.0.0.1", "--port", "0", "--workers", "2", "memory:1M",
                       "--filter", "log"], cwd=tmp_path)
    try:
        h = connect(srv.uri)
        h.pwrite(b"x" * 512, 4096)
        h.shutdown()
        assert wait_until(lambda: "disconnect" in srv.stderr, 10), srv.stderr
        assert re.search(r"INFO conn=1 id=1 op=write offset=0x1000 length=512 flags=- "
                         r"result=ok elapsed=\d", srv.stderr), srv.stderr
        assert "export  selected" not in srv.stderr  # -v chatter stays off
    finally:
        srv.stop()


PLUGIN = '''
import errno
from pynbd.backends import Backend, BackendError


class Evil(Backend):
    """Errors whose text tries to forge log lines."""
    size = 1 << 20

    def pread_into(self, buf, offset):
        raise BackendError(errno.EIO, "bad\\n2026-01-01 00:00:00.000000 pid=1 conn=9 "
                                      "id=1 op=read FORGED\\x1b[2J\\u202e")

    def pwrite(self, buf, offset, fua=False):
        raise ValueError("oops\\r\\nFORGED too")
'''


def test_error_text_cannot_forge_log_lines(ops_serve, tmp_path: Path) -> None:
    plugin = tmp_path / "evil.py"
    plugin.write_text(PLUGIN)
    log = tmp_path / "requests.log"
    s = ops_serve("--workers", "1", f"python:{plugin}", "--filter", f"log:file={log}")
    h = connect(s.uri)
    with pytest.raises(nbd.Error):
        h.pread(512, 0)
    with pytest.raises(nbd.Error):
        h.pwrite(b"z" * 512, 0)
    h.shutdown()
    assert wait_until(lambda: "disconnect" in log.read_text(), 10)
    text = log.read_text()
    assert "\x1b" not in text and "\u202e" not in text and "\r" not in text
    lines = parse(log)  # every line is one of ours: nothing forged
    assert not any(line.startswith("2026-01-01") for line in text.splitlines())
    assert any("FORGED" in (m["detail"] or "") and "\\x0a" in m["detail"] for m in lines)
    bug = [m for m in lines if m["result"] == "result=bug"]
    assert bug and "exception=ValueError" in bug[0]["detail"]
    assert s.srv.alive()


@pytest.mark.parametrize(("flt", "message"), [
    ("log:file=/nonexistent-dir/x.log", "filter log: cannot open /nonexistent-dir/x.log"),
    ("log:level=debug", "unknown parameter 'level'"),
])
def test_serve_refuses_bad_log_parameters(flt: str, message: str) -> None:
    p = serve_refused("memory:1M", "--filter", flt)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr, p.stderr
    assert no_traceback(p.stderr), p.stderr


def test_log_cannot_change_at_run_time(ops_serve, tmp_path: Path) -> None:
    s = ops_serve("--workers", "1", "memory:1M", "--filter", f"log:file={tmp_path / 'l'}")
    r = s.configure("log", "file=/tmp/other")
    assert r.returncode == 2 and "cannot be changed at run time" in r.stderr, r.stderr
