"""The delay filter: admission on a virtual clock (no wall-clock timing assertions),
held requests do not block other connections (libnbd, qemu-io), run-time changes, the
thread-sleeping mode against the server's request deadline (the slow backend of
tests/security/test_limits.py, now a filter), bad parameters."""

from __future__ import annotations

import nbd
import pytest

from pynbd.backends.base import ConfigError
from pynbd.backends.loader import FilterSpec, open_filter
from pynbd.backends.memory import MemoryBackend
from pynbd.filters.base import Verdict
from pynbd.filters.delay import MAX_HOLD, DelayFilter
from pynbd.filters.opsfilter import parse_duration
from tests.filters.ops_support import connect, no_traceback, ops_serve, qemu_io, serve_refused

__all__ = ["ops_serve"]

MiB = 1024 * 1024


def delay_filter(**params: str) -> DelayFilter:
    f = open_filter(FilterSpec("delay", dict(params)), MemoryBackend(8 * MiB))
    assert isinstance(f, DelayFilter)
    return f


def run_until_go(conn: DelayFilter, cmd: str, now: float) -> float:
    """Ask like the server does (again after each WAIT's delay); when it went."""
    for _ in range(100_000):
        a = conn.admit(cmd, 0, 4096, now)
        if a.verdict is Verdict.GO:
            return now
        assert a.verdict is Verdict.WAIT and a.delay is not None
        assert 0 < a.delay <= MAX_HOLD + 1e-9
        now += a.delay
    raise AssertionError("never admitted")


# --- admission on a virtual clock ----------------------------------------------------------

@pytest.mark.parametrize(("param", "cmd"), [
    ("rdelay", "READ"), ("delay-read", "READ"), ("wdelay", "WRITE"),
    ("delay-write", "WRITE"), ("delay-trim", "TRIM"), ("delay-zero", "WRITE_ZEROES"),
    ("delay-flush", "FLUSH"), ("delay-cache", "CACHE"), ("delay-extents", "BLOCK_STATUS")])
def test_each_parameter_delays_its_operation_only(param: str, cmd: str) -> None:
    f = delay_filter(**{param: "1.5"})
    c = f.open_connection("", False)
    assert isinstance(c, DelayFilter)
    assert run_until_go(c, cmd, 100.0) == pytest.approx(101.5)
    for other in ("READ", "WRITE", "TRIM", "WRITE_ZEROES", "FLUSH", "CACHE", "BLOCK_STATUS"):
        if other != cmd:
            assert c.admit(other, 0, 4096, 200.0).verdict is Verdict.GO
    op = {"READ": "read", "WRITE": "write", "TRIM": "trim", "WRITE_ZEROES": "zero",
          "FLUSH": "flush", "CACHE": "cache", "BLOCK_STATUS": "extents"}[cmd]
    st = f.stats()
    assert st["delayed"][op] == 1 and sum(st["delayed"].values()) == 1


def test_delays_add_up_on_one_connection_but_not_across_connections() -> None:
    f = delay_filter(rdelay="10ms")
    one = f.open_connection("", False)
    assert isinstance(one, DelayFilter)
    now = 0.0
    for _ in range(10):  # one connection: its requests are admitted in order
        now = run_until_go(one, "READ", now)
    assert now == pytest.approx(0.1)
    # ten connections at once: each waits its own 10 ms, side by side
    conns = [f.open_connection("", False) for _ in range(10)]
    firsts = [c.admit("READ", 0, 4096, 5.0) for c in conns]
    assert all(a.verdict is Verdict.WAIT and a.delay == pytest.approx(0.01) for a in firsts)
    assert all(c.admit("READ", 0, 4096, 5.01).verdict is Verdict.GO for c in conns)


def test_shortened_delay_applies_to_held_requests() -> None:
    f = delay_filter(wdelay="3600")
    c = f.open_connection("", False)
    a = c.admit("WRITE", 0, 4096, 10.0)
    assert a.verdict is Verdict.WAIT and a.delay == MAX_HOLD  # asked again soon
    assert c.admit("WRITE", 0, 4096, 10.0 + MAX_HOLD).verdict is Verdict.WAIT
    f.configure({"wdelay": "1"})
    assert c.admit("WRITE", 0, 4096, 10.5).verdict is Verdict.WAIT
    assert c.admit("WRITE", 0, 4096, 11.0).verdict is Verdict.GO
    f.configure({"delay-write": "0"})
    assert c.admit("WRITE", 0, 4096, 11.0).verdict is Verdict.GO


@pytest.mark.parametrize(("text", "secs"), [
    ("0.5", 0.5), ("2s", 2.0), ("250ms", 0.25), ("100us", 1e-4), ("1000ns", 1e-6),
    ("0", 0.0), (" 3 ", 3.0), (".5", 0.5)])
def test_parse_duration(text: str, secs: float) -> None:
    assert parse_duration(text) == pytest.approx(secs)


@pytest.mark.parametrize("text", ["-1", "abc", "2h", "7200", "1e3", "", "5 ms x"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_conflicting_aliases_refused() -> None:
    with pytest.raises(ConfigError, match="rdelay is delay-read"):
        delay_filter(rdelay="1", **{"delay-read": "2"})
    assert delay_filter(rdelay="1", **{"delay-read": "1"}).delays["read"] == 1.0


def test_mode_cannot_change_at_run_time() -> None:
    f = delay_filter(rdelay="1")
    with pytest.raises(ConfigError, match="cannot be changed"):
        f.configure({"mode": "sleep"})
    with pytest.raises(ConfigError, match="unknown parameter"):
        f.configure({"rdelay": "1", "speed": "2"})
    with pytest.raises(ConfigError, match="invalid duration"):
        f.configure({"rdelay": "soon"})
    assert f.delays["read"] == 1.0


def test_sleep_mode_makes_the_stack_blocking() -> None:
    hold = delay_filter(rdelay="1")
    assert hold.admits and not hold.blocking
    sleep = delay_filter(rdelay="1", mode="sleep")
    assert not sleep.admits and sleep.blocking and sleep.sendfile_fd is None


# --- end to end ------------------------------------------------------------------------------

@pytest.mark.parametrize("workers", ["1", "2"])
def test_held_request_does_not_block_other_connections(ops_serve, workers: str) -> None:
    """A write held for an hour (until the delay is lifted at run time) while another
    connection -- libnbd and qemu-io -- reads, trims and flushes."""
    s = ops_serve("--workers", workers, "memory:8M", "--filter", "delay:wdelay=3600")
    a = connect(s.uri)
    cookie = a.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"w" * 4096)), 0)
    s.wait_for(lambda: s.filter_stats("delay").get("delayed", {}).get("write") == 1,
               "the write to be held")
    b = connect(s.uri)
    assert b.pread(4096, 4096) == bytes(4096)
    b.trim(4096, 8192)
    b.flush()
    q = qemu_io(s.uri, "read -P 0 64k 64k")
    assert q.returncode == 0 and "read 65536/65536" in q.stdout, q.stdout + q.stderr
    assert a.aio_command_completed(cookie) is False  # still held
    r = s.configure("delay", "wdelay=0")
    assert r.returncode == 0, r.stderr
    for _ in range(600):
        if a.aio_command_completed(cookie):
            break
        a.poll(100)
    else:
        raise AssertionError("the held write never completed after the delay was lifted")
    assert b.pread(4096, 0) == b"w" * 4096
    st = s.filter_stats("delay")
    assert st["delayed"]["write"] == 1 and st["delayed"]["read"] == 0
    a.shutdown()
    b.shutdown()


def test_qemu_io_and_libnbd_through_read_delay(ops_serve) -> None:
    s = ops_serve("--workers", "1", "memory:8M", "--filter", "delay:rdelay=20ms,delay-zero=5ms")
    q = qemu_io(s.uri, "write -P 0x5a 0 128k", "read -P 0x5a 0 128k", "write -z 128k 64k",
                "read -P 0 128k 64k")
    assert q.returncode == 0, q.stdout + q.stderr
    assert "Pattern verification failed" not in q.stdout
    h = connect(s.uri)
    for i in range(5):
        assert h.pread(4096, i * 4096) == b"\x5a" * 4096
    h.shutdown()
    st = s.filter_stats("delay")
    assert st["delayed"]["read"] >= 7 and st["delayed"]["zero"] >= 1
    assert st["delayed"]["write"] == 0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_request_deadline_drops_client_stuck_in_sleeping_delay(ops_serve, workers: str) -> None:
    """tests/security/test_limits.py's slow backend as a filter: a read that sleeps 3 s
    in the call, past the 0.5 s request deadline, gets its client dropped; another
    client (writing: not delayed) keeps being served."""
    s = ops_serve("--workers", workers, "--request-timeout", "0.5", "memory:4M",
                  "--filter", "delay:rdelay=3,mode=sleep")
    stuck = connect(s.uri)
    fine = connect(s.uri)
    with pytest.raises(nbd.Error):
        stuck.pread(4096, 2 * MiB)
    fine.pwrite(b"f" * 4096, 0)
    fine.flush()
    assert s.status()["connections_killed"] == 1
    fine.shutdown()
    assert "request running for" in s.log()


def test_held_request_is_not_running_for_the_request_deadline(ops_serve) -> None:
    """mode=hold parks the request before it runs: the request deadline is about
    requests stuck in the storage, so a 1 s injected delay past a 0.5 s deadline
    completes and nobody is dropped."""
    s = ops_serve("--workers", "1", "--request-timeout", "0.5", "memory:4M",
                  "--filter", "delay:rdelay=1")
    h = connect(s.uri)
    assert h.pread(4096, 0) == bytes(4096)
    assert s.status()["connections_killed"] == 0
    h.shutdown()


def test_sleeping_delay_blocks_no_other_connection(ops_serve) -> None:
    """mode=sleep: a read sleeping 30 s on a worker thread; another connection's
    requests run meanwhile (the stack runs on threads)."""
    s = ops_serve("--workers", "1", "memory:4M", "--filter", "delay:rdelay=30,mode=sleep")
    slow = connect(s.uri)
    cookie = slow.aio_pread(nbd.Buffer(4096), 0)
    s.wait_for(lambda: s.filter_stats("delay")["delayed"]["read"] == 1, "the read to sleep")
    other = connect(s.uri)
    other.pwrite(b"o" * 4096, 8192)
    other.flush()
    other.trim(4096, 65536)
    assert slow.aio_command_completed(cookie) is False
    other.shutdown()
    # the sleeping thread would hold a graceful stop for 30 s: end the server here
    s.srv.proc.kill()
    s.srv.proc.wait(30)


# --- bad parameters ------------------------------------------------------------------------

@pytest.mark.parametrize(("flt", "message"), [
    ("delay:rdelay=fast", "invalid duration 'fast'"),
    ("delay:rdelay=2h", "invalid duration '2h'"),
    ("delay:wdelay=7200", "longer than 3600"),
    ("delay:mode=nap", "expected hold"),
    ("delay:rdelay=1,delay-read=2", "both set the read delay"),
    ("delay:ddelay=1", "unknown parameter 'ddelay'"),
])
def test_serve_refuses_bad_delay_parameters(flt: str, message: str) -> None:
    p = serve_refused("memory:1M", "--filter", flt)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and "filter delay" in p.stderr, p.stderr
    assert no_traceback(p.stderr), p.stderr


def test_filter_command_refuses_mode_change(ops_serve) -> None:
    s = ops_serve("--workers", "2", "memory:1M", "--filter", "delay:rdelay=1ms")
    r = s.configure("delay", "mode=sleep")
    assert r.returncode == 2 and "mode cannot be changed at run time" in r.stderr, r.stderr
    r = s.configure("delay", "rdelay=0", "wdelay=2ms")
    assert r.returncode == 0, r.stderr
    st = s.filter_stats("delay")
    assert st["delays"] == {"write": "0.002"}
