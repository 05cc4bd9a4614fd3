"""The names a migration reports, as enums: where a mirror is, how it ended, the exit
code ``pynbd mirror --wait`` turns that into, and the states the durable records hold.

They are ``StrEnum``/``IntEnum``: the status JSON, the records and the exit codes carry
exactly the strings and numbers they always did (docs/migration.md).
"""

from __future__ import annotations

import enum


class MirrorState(enum.StrEnum):
    """Where a source's mirror is (``state`` in ``pynbd migration-status``)."""

    IDLE = "idle"
    STARTING = "starting"
    CONNECTING = "connecting"
    ZEROING = "zeroing"
    COPYING = "copying"
    PRE_FLUSH = "pre-flush"
    RETRYING = "retrying"
    # the handover (pynbd.migration.handover)
    PAUSING = "pausing"
    FINAL_COPY = "final-copy"
    COMMITTING = "committing"
    IN_DOUBT = "in-doubt"
    COMPLETED = "completed"
    #: (no mirror) the export stepped down before this server started
    STEPPED_DOWN = "stepped-down"
    # a mirror that ended otherwise says how (its result)
    CONNECT_FAILED = "connect-failed"
    REJECTED = "rejected"
    BROKEN = "broken"
    FAILED = "failed"


class MirrorResult(enum.StrEnum):
    """How a mirror ended (``result``; None while it runs)."""

    COMPLETED = "completed"
    CONNECT_FAILED = "connect-failed"
    REJECTED = "rejected"
    BROKEN = "broken"
    FAILED = "failed"
    IN_DOUBT = "in-doubt"
    #: a restart found a handover in doubt and the destination said it did not commit
    ABORTED = "aborted"


class ExitCode(enum.IntEnum):
    """Exit codes of ``pynbd mirror`` (``--wait``: how the migration ended)."""

    COMPLETED = 0
    CONTROL_ERROR = 1
    CONTROL_UNREACHABLE = 3
    CONNECT_FAILED = 10
    REJECTED = 11
    BROKEN = 12
    FAILED = 13
    IN_DOUBT = 14


#: the exit code for each result ``pynbd mirror --wait`` can end with
RESULT_EXIT: dict[str, ExitCode] = {
    MirrorResult.COMPLETED: ExitCode.COMPLETED,
    MirrorResult.CONNECT_FAILED: ExitCode.CONNECT_FAILED,
    MirrorResult.REJECTED: ExitCode.REJECTED,
    MirrorResult.BROKEN: ExitCode.BROKEN,
    MirrorResult.FAILED: ExitCode.FAILED,
    MirrorResult.IN_DOUBT: ExitCode.IN_DOUBT,
}


class SourceRecord(enum.StrEnum):
    """``state`` of a source's durable record (pynbd.migration.records)."""

    COMMITTING = "committing"
    STEPPED_DOWN = "stepped-down"
    RESUMED = "resumed"


class DestinationState(enum.StrEnum):
    """Where a destination is; also ``state`` of its durable record."""

    IDLE = "idle"
    RECEIVING = "receiving"
    AUTHORITATIVE = "authoritative"
