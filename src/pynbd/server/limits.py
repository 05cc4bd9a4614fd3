"""Limits that keep one client from hurting the others."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Limits:
    #: negotiated connections in total, and from one address
    max_connections: int = 256
    max_connections_per_address: int = 32
    #: connections still negotiating (their own pool): when it is full, the oldest
    #: silent connection, else the oldest negotiating one, is dropped to make room.
    #: Silent connections wait in the supervisor and cost a descriptor and ~2 KiB each
    max_handshakes: int = 1024
    max_handshakes_per_address: int = 128
    #: a client must finish option haggling within this many seconds
    handshake_timeout: float = 5.0
    #: requests in flight per connection (worker-thread backends) before reading pauses
    max_inflight: int = 64
    #: worker threads per worker process for blocking backends (librbd, plugins)
    blocking_threads: int = 32
    #: drop a client whose request takes longer than this (0 = off; flexnbd's killswitch)
    request_timeout: float = 0.0
