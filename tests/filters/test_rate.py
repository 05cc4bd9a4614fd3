"""The rate filter: the token bucket and the filter's admission on a virtual clock (no
wall-clock timing anywhere), shared total buckets across processes, run-time changes
over the control socket, and end-to-end sanity with libnbd and nbdcopy (asserting the
filter's own counters, not elapsed time)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import nbd
import pytest

from pynbd.backends.base import ConfigError
from pynbd.backends.loader import FilterSpec, open_filter
from pynbd.backends.memory import MemoryBackend
from pynbd.filters.base import GO, Admission, Filter, Verdict
from pynbd.filters.rate import MAX_HOLD, RateFilter, RateState, TokenBucket, parse_rate
from tests.filters.ops_support import (
    connect,
    need,
    no_traceback,
    ops_serve,
    pynbd,
    serve_refused,
)
from tests.support.processes import pynbd_env

__all__ = ["ops_serve"]

KiB = 1024
MiB = 1024 * 1024


# --- the bucket ----------------------------------------------------------------------

def test_bucket_starts_full_and_goes_into_debt() -> None:
    b = TokenBucket()
    b.set_limit(1000.0, 2000.0, now=10.0)
    b.take(2000, now=10.0)
    assert b.wait(10.0) == 0.0
    b.take(1000, now=10.0)
    assert b.wait(10.0) == pytest.approx(1.0)
    assert b.wait(10.5) == pytest.approx(0.5)
    assert b.wait(11.0) == 0.0
    # saving up stops at the burst size
    assert b.wait(100.0) == 0.0
    assert b.tokens == pytest.approx(2000.0)


def test_bucket_unlimited_never_waits() -> None:
    b = TokenBucket()
    b.set_limit(0.0, 0.0, now=0.0)
    for i in range(100):
        b.take(1 << 30, now=float(i))
        assert b.wait(float(i)) == 0.0


def test_bucket_clock_going_backwards_does_not_mint_tokens() -> None:
    b = TokenBucket()
    b.set_limit(100.0, 100.0, now=50.0)
    b.take(300, now=50.0)
    assert b.wait(40.0) == pytest.approx(2.0)  # an earlier "now" refills nothing
    assert b.wait(51.0) == pytest.approx(1.0)


def test_bucket_tickets_go_in_charge_order() -> None:
    """A later charge does not delay an earlier one (no starvation)."""
    b = TokenBucket()
    b.set_limit(100.0, 100.0, now=0.0)
    t1 = b.take(300, now=0.0)  # 200 in debt: 2 s
    t2 = b.take(100, now=0.5)  # charged later: 3 s
    assert b.wait_for(t1, 0.5) == pytest.approx(1.5)
    assert b.wait_for(t2, 0.5) == pytest.approx(2.5)
    t3 = b.take(1000, now=1.0)
    assert b.wait_for(t1, 1.0) == pytest.approx(1.0)  # unchanged by t3
    assert b.wait_for(t1, 2.0) == 0.0
    assert b.wait_for(t2, 2.0) == pytest.approx(1.0)
    assert b.wait_for(t3, 3.0) == pytest.approx(10.0)


def test_bucket_rate_change_keeps_debt_and_applies_new_rate() -> None:
    b = TokenBucket()
    b.set_limit(100.0, 100.0, now=0.0)
    b.take(1100, now=0.0)  # 1000 in debt: 10 s at 100 B/s
    assert b.wait(0.0) == pytest.approx(10.0)
    b.set_limit(1000.0, 1000.0, now=1.0)  # 100 repaid at the old rate, 900 left
    assert b.wait(1.0) == pytest.approx(0.9)
    b.set_limit(0.0, 0.0, now=1.5)  # unlimited: no wait
    assert b.wait(1.5) == 0.0
    b.set_limit(10.0, 50.0, now=2.0)  # limited again: starts full
    assert b.tokens == 50.0 and b.wait(2.0) == 0.0


# --- the filter's admission on a virtual clock ----------------------------------------

def rate_filter(**params: str) -> RateFilter:
    f = open_filter(FilterSpec("rate", dict(params)), MemoryBackend(64 * MiB))
    assert isinstance(f, RateFilter)
    return f


class Sim:
    """A virtual server: connections with queues of (command, length), admitted in
    order per connection like the real server does (a held request is asked again
    after its delay, before any later one of its connection)."""

    def __init__(self, top: Filter, nconns: int, start: float = 1000.0) -> None:
        self.now = start
        self.conns = [top.open_connection("", False) for _ in range(nconns)]
        self.ready = [start] * nconns
        self.done: list[tuple[float, int, str, int]] = []  # (time, conn, cmd, length)
        self.waits = 0

    def run(self, queues: list[list[tuple[str, int]]], until: float | None = None,
            max_steps: int = 1_000_000) -> None:
        heads = [0] * len(queues)
        for _ in range(max_steps):
            live = [i for i, q in enumerate(queues) if heads[i] < len(q)]
            if not live:
                return
            i = min(live, key=lambda j: (self.ready[j], j))
            self.now = max(self.now, self.ready[i])
            if until is not None and self.now > until:
                return
            cmd, length = queues[i][heads[i]]
            a = self.conns[i].admit(cmd, 0, length, self.now)
            if a.verdict is Verdict.GO:
                self.done.append((self.now, i, cmd, length))
                heads[i] += 1
                self.ready[i] = self.now
            else:
                assert a.verdict is Verdict.WAIT and a.delay is not None and a.delay > 0
                assert a.delay <= MAX_HOLD + 1e-9
                self.waits += 1
                self.ready[i] = self.now + a.delay
        raise AssertionError("simulation did not finish")

    def bytes_by(self, t: float, conn: int | None = None, cmd: str | None = None) -> int:
        return sum(n for when, c, k, n in self.done if when <= t
                   and (conn is None or c == conn) and (cmd is None or k == cmd))


def test_total_rate_on_virtual_clock() -> None:
    f = rate_filter(rate="1M", burst="256K")
    sim = Sim(f, 1)
    sim.run([[("WRITE", 64 * KiB)] * 320])  # 20 MiB
    start = 1000.0
    # a burst, then one request per 1/16 s: at every moment, at most rate*t + burst
    for t in (0.0, 0.5, 1.0, 3.3, 10.0, 18.0):
        got = sim.bytes_by(start + t)
        assert got <= 1 * MiB * t + 256 * KiB + 64 * KiB + 1
        assert got >= 1 * MiB * t - 64 * KiB  # and the limit is no lower than asked
    end = sim.done[-1][0] - start
    assert end == pytest.approx((20 * MiB - 256 * KiB) / MiB, abs=0.01)
    assert f.stats()["held_requests"] > 0
    assert f.stats()["bytes_written"] == 20 * MiB


def test_total_rate_is_shared_by_connections_on_virtual_clock() -> None:
    f = rate_filter(rate="2M", burst="128K")
    sim = Sim(f, 4)
    sim.run([[("READ", 32 * KiB)] * 256 for _ in range(4)])  # 4 x 8 MiB
    end = sim.done[-1][0] - 1000.0
    assert end == pytest.approx((32 * MiB - 128 * KiB) / (2 * MiB), abs=0.02)
    # every connection made progress all along: no one starves
    for c in range(4):
        assert sim.bytes_by(1000.0 + end / 2, conn=c) >= 2 * MiB


def test_connection_rate_limits_each_connection_separately() -> None:
    f = rate_filter(**{"connection-rate": "1M", "burst": "64K"})
    sim = Sim(f, 3)
    sim.run([[("WRITE", 64 * KiB)] * 64 for _ in range(3)])  # 3 x 4 MiB
    end = sim.done[-1][0] - 1000.0
    # each connection alone at 1 MiB/s: the three finish together, in ~4 s, not ~12
    assert end == pytest.approx((4 * MiB - 64 * KiB) / MiB, abs=0.01)
    for c in range(3):
        assert sim.bytes_by(1000.0 + 2.0, conn=c) <= 2 * MiB + 128 * KiB


def test_read_and_write_rates_are_separate() -> None:
    f = rate_filter(**{"read-rate": "4M", "write-rate": "1M", "burst": "64K"})
    sim = Sim(f, 2)
    sim.run([[("READ", 64 * KiB)] * 128, [("WRITE", 64 * KiB)] * 32])  # 8 MiB, 2 MiB
    reads = [w for w, _c, k, _n in sim.done if k == "READ"]
    writes = [w for w, _c, k, _n in sim.done if k == "WRITE"]
    assert max(reads) - 1000.0 == pytest.approx((8 * MiB - 64 * KiB) / (4 * MiB), abs=0.01)
    assert max(writes) - 1000.0 == pytest.approx((2 * MiB - 64 * KiB) / MiB, abs=0.01)


def test_commands_without_data_pass() -> None:
    f = rate_filter(rate="1K", burst="1K")
    c = f.open_connection("", False)
    assert c.admit("WRITE", 0, 64 * KiB, 5.0).verdict is Verdict.WAIT
    c2 = f.open_connection("", False)
    for cmd in ("FLUSH", "TRIM", "WRITE_ZEROES", "CACHE", "BLOCK_STATUS"):
        assert c2.admit(cmd, 0, 1 << 30, 5.0).verdict is Verdict.GO
    assert c2.admit("READ", 0, 0, 5.0).verdict is Verdict.GO  # nothing to move


def test_raising_the_rate_at_run_time_frees_held_requests() -> None:
    f = rate_filter(rate="1K", burst="1K")
    c = f.open_connection("", False)
    now = 100.0
    assert c.admit("WRITE", 0, 1 * MiB, now).verdict is Verdict.WAIT  # ~17 min of debt
    f.reconfigure({"rate": "0"}, now + 0.1)
    # the held request is asked about again within MAX_HOLD and goes
    a = c.admit("WRITE", 0, 1 * MiB, now + MAX_HOLD)
    assert a.verdict is Verdict.GO
    f.reconfigure({"rate": "1M", "burst": "0", "burstiness": "1"}, now + 1)
    c2 = f.open_connection("", False)
    assert c2.admit("READ", 0, 512 * KiB, now + 1).verdict is Verdict.GO
    assert c2.admit("READ", 0, 1 * MiB, now + 1).verdict is Verdict.WAIT


def test_connection_rate_change_reaches_open_connections() -> None:
    f = rate_filter(**{"connection-rate": "1K", "burst": "1K"})
    c = f.open_connection("", False)
    assert c.admit("READ", 0, 64 * KiB, 0.0).verdict is Verdict.WAIT
    f.reconfigure({"connection-rate": "off"}, 0.1)
    assert c.admit("READ", 0, 64 * KiB, 0.2).verdict is Verdict.GO


class HoldOnce(Filter):
    """Holds every request once (like a paused export), to check that the rate filter
    above it does not charge a request twice when asked again."""

    admits = True

    def __init__(self, next: object) -> None:
        super().__init__(next)  # type: ignore[arg-type]
        self.seen = 0

    def admit(self, cmd: str, offset: int, length: int, now: float) -> Admission:
        self.seen += 1
        if self.seen % 2:
            return Admission(Verdict.WAIT, delay=0.5)
        return GO


def test_request_held_below_is_not_charged_twice() -> None:
    below = HoldOnce(MemoryBackend(1 * MiB))
    f = RateFilter(below, rate=1000, burst=1000)
    c = f.open_connection("", False)
    assert c.admit("WRITE", 0, 1000, 0.0).verdict is Verdict.WAIT  # held below
    assert c.admit("WRITE", 0, 1000, 0.5).verdict is Verdict.GO  # not charged again
    assert f.stats()["held_requests"] == 0
    # the next one is charged once: 1000 B of debt at 1000 B/s
    assert c.admit("WRITE", 0, 1000, 0.5).verdict is Verdict.WAIT
    assert c.admit("WRITE", 0, 1000, 0.5 + MAX_HOLD).verdict is Verdict.WAIT
    assert c.admit("WRITE", 0, 1000, 1.5).verdict is Verdict.WAIT  # held below again
    assert c.admit("WRITE", 0, 1000, 2.0).verdict is Verdict.GO


# --- parameters --------------------------------------------------------------------

@pytest.mark.parametrize(("text", "value"), [
    ("10M", 10 * MiB), ("512K/s", 512 * KiB), ("0", 0), ("off", 0), ("1g", 1 << 30),
    ("unlimited", 0), ("4096", 4096)])
def test_parse_rate(text: str, value: int) -> None:
    assert parse_rate(text) == value


@pytest.mark.parametrize("params", [
    {"rate": "fast"}, {"rate": "-1M"}, {"burstiness": "0"}, {"burstiness": "x"},
    {"burst": "lots"}, {"speed": "1M"}, {"shared-fd": "nope"}])
def test_bad_parameters_are_config_errors(params: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as exc:
        rate_filter(**params)
    assert "filter rate" in str(exc.value)


def test_bad_run_time_change_changes_nothing() -> None:
    f = rate_filter(rate="1M")
    for bad in ({"rate": "1M", "connection-rate": "x"}, {"nope": "1"}, {"shared-fd": "3"}):
        with pytest.raises(ConfigError):
            f.reconfigure(bad, 1.0)
    assert f.stats()["limits"]["rate"] == str(MiB)
    assert f.stats()["limits"]["connection-rate"] == "0"


def test_shared_fd_must_be_the_servers_block(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"x" * 8192)
    fd = os.open(p, os.O_RDWR)
    try:
        with pytest.raises(ConfigError, match="shared rate block"):
            rate_filter(**{"shared-fd": str(fd)})
    finally:
        os.close(fd)
    with pytest.raises(ConfigError, match="shared rate block"):
        rate_filter(**{"shared-fd": "987"})  # not open


# --- the shared total buckets ------------------------------------------------------------

def test_total_buckets_are_shared_across_processes() -> None:
    """The supervisor's filter moves its buckets to shared memory for the workers; a
    process that attaches (as a worker does) takes from the same bucket."""
    f = rate_filter(rate="1000", burst="10000")
    spec = f.worker_spec()
    assert spec is not None
    fdesc = spec["filters"][0]  # type: ignore[index]
    fd = int(fdesc["params"]["shared-fd"])
    assert fd in spec["fds"]  # type: ignore[operator]
    # another process (a worker would) attaches and takes 8000 of the 10000 tokens
    code = (
        "import sys\n"
        "from pynbd.filters.rate import RateState\n"
        f"st = RateState({fd})\n"
        "st.lock()\n"
        "st.totals[0].take(8000, 0.0)\n"
        "st.unlock()\n"
        "print(st.totals[0].tokens)\n")
    out = subprocess.run([sys.executable, "-c", code], pass_fds=[fd], capture_output=True,
                         text=True, timeout=60,
                         env=pynbd_env())
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == pytest.approx(2000.0)
    # this process sees the debt the other one made (the clock here is virtual: 0.0)
    c = f.open_connection("", False)
    assert c.admit("WRITE", 0, 4000, 0.0).verdict is Verdict.WAIT
    assert f.state.totals[0].tokens == pytest.approx(-2000.0)
    # and a limit changed in one process is the limit in every one
    state2 = RateState(fd)
    f.reconfigure({"rate": "5000"}, 0.0)
    assert state2.rates()["rate"] == 5000
    del state2  # the same fd as f's: f.close() closes it
    f.close()


def test_shared_bucket_lock_excludes_other_processes() -> None:
    """Many processes take from one shared bucket at once: no take is lost."""
    st = RateState()
    st.apply({"rate": 1.0, "burst": 1e9, "burstiness": 1.0}, 0.0)
    fd = st.share()
    code = (
        "from pynbd.filters.rate import RateState\n"
        f"st = RateState({fd})\n"
        "for _ in range(2000):\n"
        "    st.lock()\n"
        "    st.totals[0].take(1, 0.0)\n"
        "    st.unlock()\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], pass_fds=[fd], env=pynbd_env())
             for _ in range(4)]
    for p in procs:
        assert p.wait(120) == 0
    assert st.totals[0].tokens == pytest.approx(1e9 - 8000)
    st.close()


# --- end to end: real clients, the filter's counters (no timing assertions) --------------

@pytest.mark.parametrize("workers", ["1", "2"])
def test_total_rate_holds_requests_across_workers(ops_serve, workers: str) -> None:
    """rate=1 B/s with a 64 KiB burst: the first 64 KiB write empties the bucket, a
    second write on another connection (another worker process with --workers 2) is
    held until the limit is lifted over the control socket."""
    s = ops_serve("--workers", workers, "memory:16M", "--filter",
                  "rate:rate=1,burst=64K")
    a = connect(s.uri)
    b = connect(s.uri)  # held open together: with 2 workers, one on each
    if workers == "2":
        assert {c["worker"] for c in s.status()["client_list"]} == {0, 1}
    a.pwrite(b"a" * 64 * KiB, 0)
    done = threading.Event()
    err: list[BaseException] = []

    def write_b() -> None:
        try:
            b.pwrite(b"b" * 4 * KiB, 64 * KiB)
        except BaseException as exc:  # reported below
            err.append(exc)
        done.set()

    t = threading.Thread(target=write_b)
    t.start()
    s.wait_for(lambda: s.filter_stats("rate")["held_requests"] == 1, "the write to be held")
    assert not done.is_set()  # held, not failed
    r = s.configure("rate", "rate=0")
    assert r.returncode == 0, r.stderr
    assert "rate=0" in r.stdout
    assert done.wait(30), "the held write was not released when the limit was lifted"
    t.join(10)
    assert not err, err
    st = s.filter_stats("rate")
    assert st["requests"] == 2 and st["bytes_written"] == 68 * KiB
    assert st["held_requests"] == 1
    assert st["limits"]["rate"] == "0"
    assert st["shared"] == ("yes" if workers == "2" else "no")
    assert b.pread(4 * KiB, 64 * KiB) == b"b" * 4 * KiB
    a.shutdown()
    b.shutdown()


def test_restarted_worker_gets_the_limits_set_at_run_time(ops_serve) -> None:
    """The limits live in the shared page: a worker process that dies and is started
    again (from the command line's parameters) applies the limits changed since."""
    s = ops_serve("--workers", "2", "memory:16M", "--filter", "rate:rate=0,burst=64K")
    assert s.configure("rate", "connection-write-rate=1").returncode == 0
    victim = s.status()["worker_pids"][0]
    os.kill(victim, signal.SIGKILL)
    s.wait_for(lambda: s.status()["worker_restarts"] == 1
               and victim not in s.status()["worker_pids"], "the worker to restart")
    hs = [connect(s.uri), connect(s.uri)]  # one on each worker, the new one included
    s.wait_for(lambda: {c["worker"] for c in s.status()["client_list"]} == {0, 1},
               "a connection on each worker")
    for h in hs:
        h.pwrite(b"r" * 64 * KiB, 0)  # the burst
    cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(4 * KiB)), 0) for h in hs]
    s.wait_for(lambda: s.filter_stats("rate")["held_requests"] == 2,
               "both connections' writes held")
    assert s.configure("rate", "connection-write-rate=0").returncode == 0
    for h, cookie in zip(hs, cookies, strict=True):
        for _ in range(600):
            if h.aio_command_completed(cookie):
                break
            h.poll(100)
        else:
            raise AssertionError("a held write never completed")
        h.shutdown()


def test_connection_rate_holds_only_that_connection(ops_serve) -> None:
    s = ops_serve("--workers", "1", "memory:16M", "--filter",
                  "rate:connection-write-rate=1,burst=64K")
    a = connect(s.uri)
    b = connect(s.uri)
    a.pwrite(b"a" * 64 * KiB, 0)
    cookie = a.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"x" * KiB)), 0)
    s.wait_for(lambda: s.filter_stats("rate")["held_requests"] == 1, "a's write held")
    # b has its own bucket: a's debt does not hold it; reads are not limited
    b.pwrite(b"b" * 64 * KiB, 64 * KiB)
    assert b.pread(64 * KiB, 64 * KiB) == b"b" * 64 * KiB
    assert a.aio_command_completed(cookie) is False
    assert s.configure("rate", "connection-write-rate=10M").returncode == 0
    for _ in range(600):
        if a.aio_command_completed(cookie):
            break
        a.poll(100)
    else:
        raise AssertionError("a's held write never completed")
    assert s.filter_stats("rate")["held_requests"] == 1
    a.shutdown()
    b.shutdown()


def test_nbdcopy_through_rate_limit_copies_exactly(ops_serve, tmp_path: Path) -> None:
    """A whole-image copy in both directions through rate=16M (burst 1M): the data is
    intact and the filter counted the held requests (it did limit)."""
    need("nbdcopy")
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(8 * MiB))
    s = ops_serve("--workers", "2", "memory:8M", "--filter", "rate:rate=16M,burst=1M")
    subprocess.run(["nbdcopy", str(src), s.uri], check=True, timeout=120,
                   capture_output=True)
    back = tmp_path / "back.img"
    subprocess.run(["nbdcopy", s.uri, str(back)], check=True, timeout=120,
                   capture_output=True)
    assert hashlib.sha256(back.read_bytes()).digest() == \
        hashlib.sha256(src.read_bytes()).digest()
    st = s.filter_stats("rate")
    assert st["bytes_written"] == 8 * MiB
    assert st["bytes_read"] >= 8 * MiB
    assert st["held_requests"] > 0 and st["held_seconds"] > 0


# --- bad parameters from the command line and the control socket --------------------------

@pytest.mark.parametrize(("flt", "message"), [
    ("rate:rate=fast", "invalid rate 'fast'"),
    ("rate:sped=1M", "unknown parameter 'sped'"),
    ("rate:burstiness=-2", "burstiness="),
    ("rate:rate", "expected KEY=VALUE"),
])
def test_serve_refuses_bad_rate_parameters(flt: str, message: str) -> None:
    p = serve_refused("memory:1M", "--filter", flt)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and "filter rate" in p.stderr
    assert no_traceback(p.stderr), p.stderr


def test_filter_command_errors(ops_serve, tmp_path: Path) -> None:
    s = ops_serve("--workers", "2", "memory:1M", "--filter", "rate:rate=1M")
    r = s.configure("rate", "rate=lots")
    assert r.returncode == 2 and "invalid rate 'lots'" in r.stderr, r.stderr
    r = s.configure("rate", "shared-fd=5")
    assert r.returncode == 2 and "cannot be changed" in r.stderr, r.stderr
    r = s.configure("rate", "bogus=1")
    assert r.returncode == 2 and "unknown parameter 'bogus'" in r.stderr
    r = s.configure("cow", "x=1")
    assert r.returncode == 2 and "has no filter 'cow'" in r.stderr
    r = s.configure("rate", "rate")
    assert r.returncode == 2 and "expected KEY=VALUE" in r.stderr
    r = s.configure("rate")
    assert r.returncode == 2 and "no KEY=VALUE" in r.stderr
    r = pynbd("filter", "--control", s.control, "--export", "nope", "rate", "rate=1")
    assert r.returncode == 2 and "no export 'nope'" in r.stderr
    r = pynbd("filter", "--control", str(tmp_path / "absent.sock"), "rate", "rate=1")
    assert r.returncode == 3 and "no control socket" in r.stderr
    # nothing changed, and the server still serves
    assert s.filter_stats("rate")["limits"]["rate"] == str(MiB)
    h = connect(s.uri)
    h.pwrite(b"z" * 4096, 0)
    assert h.pread(4096, 0) == b"z" * 4096
    h.shutdown()
    assert no_traceback(s.log())
