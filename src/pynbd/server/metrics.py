"""Prometheus metrics: the status counters in text format on an optional HTTP endpoint."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import start_http_server
from prometheus_client.core import (
    REGISTRY,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from pynbd.server.server import Server


class ServerCollector(Collector):
    """Reads the server's counters at scrape time (no bookkeeping on the data path)."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily
                                  | HistogramMetricFamily]:
        st = self.server.status()
        labels = ["export"]
        size = GaugeMetricFamily("pynbd_export_size_bytes", "Export size", labels=labels)
        clients = GaugeMetricFamily("pynbd_export_clients", "Connected clients", labels=labels)
        rd = CounterMetricFamily("pynbd_export_read_bytes", "Bytes read", labels=labels)
        wr = CounterMetricFamily("pynbd_export_written_bytes", "Bytes written", labels=labels)
        req = CounterMetricFamily("pynbd_export_requests", "Requests", labels=labels)
        err = CounterMetricFamily("pynbd_export_errors", "Requests that failed", labels=labels)
        for e in st["exports"]:
            name = [e["name"]]
            size.add_metric(name, e["size_bytes"])
            clients.add_metric(name, e["clients"])
            rd.add_metric(name, e["bytes_read"])
            wr.add_metric(name, e["bytes_written"])
            req.add_metric(name, e["requests"])
            err.add_metric(name, e["errors"])
        yield from (size, clients, rd, wr, req, err)
        yield from stats_filter_metrics(st["exports"])
        yield GaugeMetricFamily("pynbd_clients", "Connected clients", value=st["clients"])
        yield CounterMetricFamily("pynbd_connections", "Connections accepted",
                                  value=st["connections_total"])
        yield CounterMetricFamily("pynbd_connections_rejected",
                                  "Connections refused (ACL, limits)",
                                  value=st["connections_rejected"])
        yield CounterMetricFamily("pynbd_connections_killed",
                                  "Connections dropped by the request deadline",
                                  value=st["connections_killed"])
        yield GaugeMetricFamily("pynbd_uptime_seconds", "Seconds since start",
                                value=st["uptime_seconds"])


#: the stats filter's histogram buckets (filters/stats.py NBUCKETS)
STATS_BUCKETS = 30


def stats_filter_metrics(exports: list[dict[str, Any]]) -> Iterator[CounterMetricFamily
                                                                   | HistogramMetricFamily]:
    """The ``stats`` filter's per-operation counters and latency histograms, for the
    exports that have one (``exports[i]["filters"]["stats"]``, see filters/stats.py)."""
    labels = ["export", "op"]
    req = CounterMetricFamily("pynbd_filter_stats_requests",
                              "Calls that reached the stats filter", labels=labels)
    nbytes = CounterMetricFamily("pynbd_filter_stats_bytes",
                                 "Bytes of those calls (read, written, trimmed, zeroed)",
                                 labels=labels)
    err = CounterMetricFamily("pynbd_filter_stats_errors", "Calls that failed",
                              labels=labels)
    lat = HistogramMetricFamily("pynbd_filter_stats_latency_seconds",
                                "Time a call spent below the stats filter", labels=labels)
    found = False
    for e in exports:
        ops = (e.get("filters") or {}).get("stats", {}).get("ops", {})
        for op, s in ops.items():
            found = True
            name = [e["name"], op]
            req.add_metric(name, s["requests"])
            nbytes.add_metric(name, s["bytes"])
            err.add_metric(name, s["errors"])
            hist = {int(k): int(v) for k, v in s["latency_us"].items()}
            buckets = []
            acc = 0
            # the filter's buckets: powers of two of microseconds (a fixed set); its
            # last one is open-ended and only in +Inf
            for k in range(STATS_BUCKETS - 1):
                acc += hist.get(1 << k, 0)
                buckets.append((repr((1 << k) / 1e6), acc))
            buckets.append(("+Inf", s["requests"]))
            lat.add_metric(name, buckets, sum_value=s["seconds"])
    if found:
        yield from (req, nbytes, err, lat)


def parse_listen(spec: str) -> tuple[str, int]:
    """``PORT``, ``HOST:PORT`` or ``[V6]:PORT``."""
    if spec.isdigit():
        return "127.0.0.1", int(spec)
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--metrics {spec!r}: expected PORT or HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def start_metrics(server: Server, spec: str) -> tuple[str, int]:
    host, port = parse_listen(spec)
    REGISTRY.register(ServerCollector(server))
    httpd, _thread = start_http_server(port, addr=host)
    real_port = httpd.server_address[1]
    return host, int(real_port)
