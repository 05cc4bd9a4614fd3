"""The access list: IPv4/IPv6 networks checked at accept time (flexnbd's model).

An empty list allows every client unless ``default_deny`` is set.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: Iterable[str]) -> list[Network]:
    nets: list[Network] = []
    for entry in entries:
        try:
            nets.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"invalid access list entry {entry!r}: {exc}") from exc
    return nets


class AccessList:
    def __init__(self, entries: Iterable[str] = (), default_deny: bool = False) -> None:
        self._nets = parse_networks(entries)
        self.default_deny = default_deny
        self._lock = threading.Lock()

    @property
    def entries(self) -> list[str]:
        return [str(n) for n in self._nets]

    def replace(self, entries: Iterable[str]) -> None:
        nets = parse_networks(entries)
        with self._lock:
            self._nets = nets

    def allows(self, host: str) -> bool:
        nets = self._nets
        if not nets:
            return not self.default_deny
        try:
            ip = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == n.version and ip in n for n in nets)
