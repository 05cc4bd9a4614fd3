"""Session state that outlives a connection: cookies, sequence numbers and the queue of
unacknowledged messages (lossless sessions)."""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field

from pynbd.msgr2._types import Buffer
from pynbd.msgr2.encoding import EntityAddrVec


def random_cookie() -> int:
    while True:
        c = int.from_bytes(os.urandom(8), "little")
        if c:
            return c


@dataclass(eq=False)
class OutMessage:
    seq: int
    type: int
    front: Buffer
    middle: Buffer
    data: Buffer
    tid: int = 0
    priority: int = 127
    version: int = 1
    compat_version: int = 1


@dataclass(eq=False)
class Session:
    """One side's view of a session. Lossless sessions keep every sent message until the
    peer acknowledges it, and resend the rest after a reconnect."""

    lossless: bool
    client_cookie: int = field(default_factory=random_cookie)
    server_cookie: int = 0
    global_seq: int = 0
    connect_seq: int = 0
    peer_global_seq: int = 0
    out_seq: int = 0
    in_seq: int = 0
    unacked: deque[OutMessage] = field(default_factory=deque)
    unacked_bytes: int = 0
    owner: object | None = None
    peer_addrs: EntityAddrVec = field(default_factory=EntityAddrVec)
    peer_gid: int = 0
    peer_features: int = 0
    established: bool = False

    def next_out(self, msg: OutMessage) -> OutMessage:
        self.out_seq += 1
        msg.seq = self.out_seq
        if self.lossless:
            self.unacked.append(msg)
            self.unacked_bytes += len(msg.front) + len(msg.middle) + len(msg.data)
        return msg

    def ack(self, seq: int) -> int:
        n = 0
        q = self.unacked
        while q and q[0].seq <= seq:
            m = q.popleft()
            self.unacked_bytes -= len(m.front) + len(m.middle) + len(m.data)
            n += 1
        return n

    def renumber(self) -> None:
        """A new session replaces the old one on the peer: number the unacknowledged
        messages from 1 again."""
        self.out_seq = 0
        for m in self.unacked:
            self.out_seq += 1
            m.seq = self.out_seq

    def drop_all(self) -> int:
        n = len(self.unacked)
        self.unacked.clear()
        self.unacked_bytes = 0
        self.out_seq = 0
        self.in_seq = 0
        return n


class SessionRegistry:
    """(server) Lossless sessions by client cookie, so reconnects find them."""

    def __init__(self) -> None:
        self.sessions: dict[int, Session] = {}

    def get(self, client_cookie: int) -> Session | None:
        return self.sessions.get(client_cookie)

    def add(self, s: Session) -> None:
        self.sessions[s.client_cookie] = s

    def remove(self, s: Session) -> None:
        if self.sessions.get(s.client_cookie) is s:
            del self.sessions[s.client_cookie]
