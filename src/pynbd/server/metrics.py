"""Prometheus metrics: the status counters in text format on an optional HTTP endpoint."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from pynbd.server.server import Server


class ServerCollector(Collector):
    """Reads the server's counters at scrape time (no bookkeeping on the data path)."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
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
