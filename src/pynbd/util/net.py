"""Small facts about network addresses that several commands need."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (an address, ``[v6]``, ``addr%scope`` or ``localhost``) names this
    machine's loopback. Names other than ``localhost`` are not resolved: False."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0]).is_loopback
    except ValueError:
        return False
