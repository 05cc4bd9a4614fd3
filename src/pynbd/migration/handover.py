"""The handover as a pure state machine: events in, effects out.

The mirror (pynbd.migration.mirror) copies until what is left fits the downtime
budget, then hands the export over in two phases (docs/migration.md): it pauses the
clients, sends the rest, flushes, records ``committing`` durably, sends COMMIT; the
destination verifies the image digest and takes over; the source steps down and
records ``stepped-down``. A crash or a lost answer anywhere leaves a record that says
what to do next. This module decides every step of that and does none of it: each
event returns the effects the driver must carry out, in order, and the driver reports
back what happened. No clock (``now`` is passed in), no I/O, no threads, so every
path, including the ones a SIGKILL would take, is a unit test
(tests/migration/test_handover.py).

::

    h = Handover(to, size, epoch_base, transport="msgr2", verified=True, ...)
    h.start(now)              -> [Pause]
    h.paused(True, now, n)    -> [FinalCopy]
    h.final_copied(now)       -> [Flush]
    h.flushed(now, last, d)   -> [Halt, Record(committing), Commit]
    h.committed(now)          -> [Halt, StepDown, Record(stepped-down), Completed]

Every list is carried out in order, and the order is the protocol: ``committing`` is
durable before COMMIT leaves, the export steps down before ``stepped-down`` is
recorded, and nothing is unlinked (``Completed``) before that record is durable.

A transport that cannot commit (plain NBD) is trusted instead: after the flush it
records ``stepped-down`` unverified and steps down.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pynbd.migration.states import MirrorState, SourceRecord

# --- effects ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pause:
    """Hold new client requests and wait (at most ``timeout`` s) for those running;
    report with :meth:`Handover.paused`."""

    timeout: float


@dataclass(frozen=True, slots=True)
class Resume:
    """Let the clients run again."""


@dataclass(frozen=True, slots=True)
class FinalCopy:
    """Send everything still dirty, unthrottled; report with
    :meth:`Handover.final_copied`."""


@dataclass(frozen=True, slots=True)
class Flush:
    """Make everything sent durable on the destination; report with
    :meth:`Handover.flushed`."""


@dataclass(frozen=True, slots=True)
class Record:
    """Replace the durable record with ``fields`` (and fsync it) before going on."""

    fields: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Halt:
    """A named point where the fault-injection hook may stop the process."""

    point: str


@dataclass(frozen=True, slots=True)
class Commit:
    """Send COMMIT; report :meth:`Handover.committed`, :meth:`Handover.refused` or
    :meth:`Handover.in_doubt`."""

    size: int
    epoch: int
    digest: str


@dataclass(frozen=True, slots=True)
class CloseTransport:
    """Drop the copy session; ``release``: give the destination's lease back."""

    release: bool


@dataclass(frozen=True, slots=True)
class AskOutcome:
    """Ask the destination (until it answers) whether ``epoch`` committed; report with
    :meth:`Handover.outcome`."""

    epoch: int


@dataclass(frozen=True, slots=True)
class StepDown:
    """Refuse every client request from now on (ESHUTDOWN): the destination owns the
    image."""

    reason: str


@dataclass(frozen=True, slots=True)
class MarkAllDirty:
    """The destination's copy cannot be trusted: everything is sent again."""


@dataclass(frozen=True, slots=True)
class Completed:
    """The handover is done: this export stepped down."""


@dataclass(frozen=True, slots=True)
class CopyOn:
    """The handover did not start (the clients did not go idle): copy on and try
    again later."""

    reason: str


@dataclass(frozen=True, slots=True)
class Retry:
    """This attempt failed and this copy is still authoritative: connect again and
    copy on (an error for the attempt count)."""

    reason: str


Effect = (Pause | Resume | FinalCopy | Flush | Record | Halt | Commit | CloseTransport
          | AskOutcome | StepDown | MarkAllDirty | Completed | CopyOn | Retry)


class HandoverError(RuntimeError):
    """An event that cannot happen in the current state (a bug in the driver)."""


@dataclass
class Handover:
    """One handover attempt of one export to ``to``.

    ``verified``: the transport commits with a digest the destination checks (msgr2);
    otherwise (NBD) the source trusts the flush. ``commit_fields`` go into the
    ``committing`` record (what a restarted source needs to ask the destination).
    """

    to: str
    size: int
    epoch_base: int
    transport: str
    verified: bool
    pause_timeout: float = 5.0
    commit_fields: Mapping[str, Any] = field(default_factory=dict)
    state: MirrorState = MirrorState.COPYING
    epoch: int = 0
    #: whether this copy is the one clients may use (False once in doubt or handed over)
    authoritative: bool = True
    paused_at: float | None = None
    pause_ms: float | None = None
    #: milliseconds per phase (final_copy, flush, commit) and the bytes of the final copy
    phases: dict[str, float] = field(default_factory=dict)
    _t: float = 0.0

    @classmethod
    def recovered(cls, to: str, size: int, epoch: int, transport: str) -> Handover:
        """A source restarted with a ``committing`` record: the outcome of ``epoch`` is
        unknown, its clients are paused; only :meth:`outcome` can follow."""
        h = cls(to, size, epoch - 1, transport, verified=True, state=MirrorState.IN_DOUBT,
                epoch=epoch, authoritative=False)
        return h

    def _expect(self, *states: MirrorState) -> None:
        if self.state not in states:
            raise HandoverError(f"handover event in state {self.state}")

    def _base(self, state: SourceRecord) -> dict[str, Any]:
        return {"role": "source", "state": state, "epoch": self.epoch, "to": self.to}

    # --- events ----------------------------------------------------------------------

    def start(self, now: float) -> list[Effect]:
        """What was left fits the downtime budget: begin."""
        self._expect(MirrorState.COPYING)
        self.state = MirrorState.PAUSING
        self._t = now
        return [Pause(self.pause_timeout)]

    def paused(self, ok: bool, now: float, dirty_bytes: int) -> list[Effect]:
        """The clients went idle (``ok``) or did not in time."""
        self._expect(MirrorState.PAUSING)
        if not ok:
            self.state = MirrorState.COPYING
            return [Resume(), CopyOn(f"clients did not go idle within "
                                     f"{self.pause_timeout:.1f} s")]
        self.state = MirrorState.FINAL_COPY
        self.paused_at = self._t = now
        self.phases = {"final_bytes": dirty_bytes}
        return [FinalCopy()]

    def final_copied(self, now: float) -> list[Effect]:
        self._expect(MirrorState.FINAL_COPY)
        self.phases["final_copy"] = self._ms(now)
        return [Flush()]

    def flushed(self, now: float, last_epoch: int = 0, digest: str = "") -> list[Effect]:
        """The destination has everything durably. ``last_epoch``: the newest epoch it
        has seen; ``digest``: the image digest of what was sent (verified transports)."""
        self._expect(MirrorState.FINAL_COPY)
        self.phases["flush"] = self._ms(now)
        if not self.verified:
            self.epoch = self.epoch_base + 1
            record = dict(self._base(SourceRecord.STEPPED_DOWN), transport=self.transport,
                          verified=False)
            return [Record(record), self._step_down(now), Completed()]
        self.epoch = max(self.epoch_base, last_epoch) + 1
        self.state = MirrorState.COMMITTING
        record = dict(self._base(SourceRecord.COMMITTING), **self.commit_fields,
                      size=self.size, digest=digest)
        return [Halt("source:before-commit"), Record(record),
                Commit(self.size, self.epoch, digest)]

    def committed(self, now: float) -> list[Effect]:
        """The destination acknowledged COMMIT: it is authoritative now."""
        self._expect(MirrorState.COMMITTING)
        self.phases["commit"] = self._ms(now)
        return [Halt("source:acked"), self._step_down(now), self._stepped_down_record(),
                Completed()]

    def refused(self, error: str) -> list[Effect]:
        """The destination refused COMMIT: it definitely did not take over."""
        self._expect(MirrorState.COMMITTING)
        self.state = MirrorState.COPYING
        self.epoch_base = self.epoch
        return [Record(self._base(SourceRecord.RESUMED)), MarkAllDirty(),
                Retry(f"commit refused: {error}")]

    def in_doubt(self, error: str) -> list[Effect]:
        """COMMIT went out and no answer came back: nobody knows who owns the image.
        The clients stay paused until the destination says."""
        self._expect(MirrorState.COMMITTING)
        self.state = MirrorState.IN_DOUBT
        self.authoritative = False
        return [CloseTransport(release=False), AskOutcome(self.epoch)]

    def outcome(self, committed: bool, now: float) -> list[Effect]:
        """The destination answered whether the epoch in doubt committed."""
        self._expect(MirrorState.IN_DOUBT)
        if committed:
            return [self._step_down(now), self._stepped_down_record(), Completed()]
        self.state = MirrorState.COPYING
        self.authoritative = True
        self.epoch_base = self.epoch
        return [Record(self._base(SourceRecord.RESUMED)), Resume(),
                Retry("destination did not commit; copying on")]

    # --- helpers ---------------------------------------------------------------------

    def _ms(self, now: float) -> float:
        ms = round((now - self._t) * 1000, 1)
        self._t = now
        return ms

    def _step_down(self, now: float) -> StepDown:
        # Step down first (clients waiting in the pause get ESHUTDOWN now), record it
        # after: a crash in between leaves "committing", which a restart resolves by
        # asking the destination, so nothing is lost by the order.
        self.state = MirrorState.COMPLETED
        self.authoritative = False
        if self.paused_at is not None:
            self.pause_ms = round((now - self.paused_at) * 1000, 1)
        return StepDown(f"migrated to {self.to} (epoch {self.epoch})")

    def _stepped_down_record(self) -> Record:
        return Record(dict(self._base(SourceRecord.STEPPED_DOWN), transport=self.transport,
                           verified=self.verified))
