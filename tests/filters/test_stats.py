"""The stats filter: exact per-operation counts and bytes for what real clients (libnbd,
fio) sent, errors from a layer below, histograms that add up, the sum over worker
processes in ``pynbd status``, and the Prometheus metrics."""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request
from typing import Any

import nbd
import pytest

from pynbd.backends.base import Backend, BackendError
from pynbd.backends.loader import FilterSpec, open_filter
from pynbd.backends.memory import MemoryBackend
from pynbd.filters.stats import NBUCKETS, StatsFilter, bucket_of
from tests.filters.ops_support import connect, need, no_traceback, ops_serve, serve_refused

__all__ = ["ops_serve"]

MiB = 1024 * 1024


def stats_filter(below: Backend) -> StatsFilter:
    f = open_filter(FilterSpec("stats", {}), below)
    assert isinstance(f, StatsFilter)
    return f


def check_histograms(ops: dict[str, Any]) -> None:
    for op, s in ops.items():
        assert sum(s["latency_us"].values()) == s["requests"], op
        assert (s["seconds"] > 0) == (s["requests"] > 0), op
        assert all(int(k) & (int(k) - 1) == 0 for k in s["latency_us"]), op  # powers of 2


# --- in the filter ----------------------------------------------------------------------

@pytest.mark.parametrize(("ns", "bucket"), [
    (0, 0), (999, 0), (1000, 1), (1999, 1), (2000, 2), (3999, 2), (4000, 3), (7999, 3),
    (8000, 4), (1_000_000, 10), (10**15, NBUCKETS - 1)])
def test_bucket_of(ns: int, bucket: int) -> None:
    assert bucket_of(ns) == bucket


class NotResident(MemoryBackend):
    """Reads are never in memory: the server must read on a thread."""

    def pread_nowait(self, buf: memoryview, offset: int) -> bool:
        return False


class FailsTrim(MemoryBackend):
    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        raise BackendError(5, "no trim today")


def test_counts_bytes_errors_in_the_filter() -> None:
    f = stats_filter(FailsTrim(1 * MiB))
    buf = memoryview(bytearray(4096))
    f.pwrite(b"x" * 1000, 0)
    f.pwrite(b"x" * 24, 1000, fua=True)
    f.pread_into(buf, 0)
    assert f.pread_nowait(buf, 0)
    with pytest.raises(BackendError):
        f.trim(0, 4096)
    f.zero(0, 8192)
    f.flush()
    f.cache(0, 4096)
    f.extents(0, 65536)
    ops = f.stats()["ops"]
    assert {op: (s["requests"], s["bytes"], s["errors"]) for op, s in ops.items()} == {
        "read": (2, 8192, 0), "write": (2, 1024, 0), "trim": (1, 4096, 1),
        "zero": (1, 8192, 0), "flush": (1, 0, 0), "cache": (1, 4096, 0),
        "extents": (1, 65536, 0)}
    check_histograms(ops)


def test_read_handed_to_a_thread_is_counted_once() -> None:
    f = stats_filter(NotResident(1 * MiB))
    buf = memoryview(bytearray(512))
    assert f.pread_nowait(buf, 0) is False  # not counted: the server retries ...
    f.pread_into(buf, 0)  # ... here, on a thread
    assert f.stats()["ops"]["read"]["requests"] == 1


def test_stats_take_no_parameters() -> None:
    p = serve_refused("memory:1M", "--filter", "stats:buckets=10")
    assert p.returncode == 2 and "unknown parameter 'buckets'" in p.stderr
    assert "(known: none)" in p.stderr and no_traceback(p.stderr)


# --- real clients ---------------------------------------------------------------------------

def try_trim(h: nbd.NBD, length: int, offset: int) -> int:
    """1 if the trim failed (the error filter below stats fails half of them)."""
    try:
        h.trim(length, offset)
    except nbd.Error as exc:
        assert exc.errno == "ENOSPC"
        return 1
    return 0


def libnbd_workload(h: nbd.NBD) -> int:
    for i in range(10):
        h.pwrite(b"w" * 8192, i * 8192)
    for i in range(7):
        assert h.pread(4096, i * 4096) == b"w" * 4096
    failed = try_trim(h, 65536, 1 * MiB) + try_trim(h, 65536, 2 * MiB)
    h.zero(32768, 3 * MiB)
    h.flush()
    return failed


@pytest.mark.parametrize("workers", ["1", "2"])
def test_status_counts_exactly_what_libnbd_sent(ops_serve, workers: str) -> None:
    s = ops_serve("--workers", workers, "memory:8M", "--filter", "stats",
                  "--filter", "error:ops=trim,error=ENOSPC,rate=50%,seed=11")
    hs = [connect(s.uri), connect(s.uri)]  # with 2 workers: one on each
    failed_trims = 0
    for h in hs:
        failed_trims += libnbd_workload(h)
        for _ in range(10):
            failed_trims += try_trim(h, 4096, 4 * MiB)
    # before the clients go: their disconnect adds the server's own flush
    ops = s.filter_stats("stats")["ops"]
    got = {op: (st["requests"], st["bytes"]) for op, st in ops.items()}
    assert got == {"write": (20, 20 * 8192), "read": (14, 14 * 4096),
                   "trim": (24, 4 * 65536 + 20 * 4096), "zero": (2, 2 * 32768),
                   "flush": (2, 0), "cache": (0, 0), "extents": (0, 0)}
    assert ops["trim"]["errors"] == failed_trims == \
        s.filter_stats("error")["injected"]["trim"]
    assert 0 < failed_trims < 24
    assert all(st["errors"] == 0 for op, st in ops.items() if op != "trim")
    check_histograms(ops)
    for h in hs:
        h.shutdown()


def test_fio_requests_are_all_counted(ops_serve) -> None:
    need("fio")
    s = ops_serve("--workers", "2", "memory:64M", "--filter", "stats")
    p = subprocess.run(
        ["fio", "--name=stats", "--ioengine=nbd", f"--uri={s.uri}", "--rw=randrw",
         "--rwmixread=50", "--bs=4k", "--iodepth=16", "--size=16M", "--io_size=8M",
         "--numjobs=2", "--group_reporting", "--output-format=json"],
        capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    import json

    out = json.loads(p.stdout[p.stdout.index("{"):])
    job = out["jobs"][0]
    reads, writes = job["read"]["total_ios"], job["write"]["total_ios"]
    assert reads + writes == 2 * 2048
    ops = s.filter_stats("stats")["ops"]
    assert ops["read"]["requests"] == reads and ops["read"]["bytes"] == reads * 4096
    assert ops["write"]["requests"] == writes and ops["write"]["bytes"] == writes * 4096
    check_histograms(ops)


def scrape(s: Any) -> str:
    url = None
    for _ in range(100):
        m = re.search(r"metrics on (http://\S+)", s.log())
        if m:
            url = m.group(1)
            break
        time.sleep(0.05)
    assert url, s.log()
    return urllib.request.urlopen(url, timeout=10).read().decode()


def test_prometheus_metrics(ops_serve) -> None:
    s = ops_serve("--workers", "2", "--metrics", "127.0.0.1:0", "--export-name", "m",
                  "memory:8M", "--filter", "stats")
    h = connect(s.uri)
    for i in range(5):
        h.pwrite(b"m" * 4096, i * 4096)
    for _ in range(3):
        h.pread(4096, 0)
    text = scrape(s)
    h.shutdown()
    assert 'pynbd_filter_stats_requests_total{export="m",op="write"} 5.0' in text
    assert 'pynbd_filter_stats_bytes_total{export="m",op="write"} 20480.0' in text
    assert 'pynbd_filter_stats_requests_total{export="m",op="read"} 3.0' in text
    assert 'pynbd_filter_stats_errors_total{export="m",op="read"} 0.0' in text
    assert 'pynbd_filter_stats_latency_seconds_count{export="m",op="write"} 5.0' in text
    assert 'pynbd_filter_stats_latency_seconds_bucket{export="m",le="+Inf",op="write"} 5.0' \
        in text
    # cumulative buckets that never decrease and end at the count
    counts = [float(v) for v in re.findall(
        r'pynbd_filter_stats_latency_seconds_bucket\{export="m",le="[^"]+",op="read"\} (\S+)',
        text)]
    assert counts == sorted(counts) and counts[-1] == 3.0 and len(counts) == NBUCKETS
    assert re.search(r'pynbd_filter_stats_latency_seconds_sum\{export="m",op="read"\} '
                     r'[0-9.e-]+', text)
    # the export's own counters are still there
    assert 'pynbd_export_written_bytes_total{export="m"}' in text


def test_no_stats_metrics_without_the_filter(ops_serve) -> None:
    s = ops_serve("--workers", "1", "--metrics", "127.0.0.1:0", "memory:1M")
    text = scrape(s)
    assert "pynbd_filter_stats" not in text and "pynbd_export_size_bytes" in text
