"""Test hook: halt the process at a named handover step so a test can SIGKILL it there.

``PYNBD_MIGRATION_HALT_AT=step`` (e.g. ``source:commit-sent``) makes the thread that
reaches that step create ``PYNBD_MIGRATION_HALT_FILE`` (if set) and then block forever.
Steps: ``source:before-commit`` (paused, remainder sent and flushed, nothing recorded),
``source:commit-sent`` (``committing`` recorded, COMMIT sent), ``source:acked`` (ACK
received, ``stepped-down`` not yet recorded), ``dest:commit-received`` (COMMIT received,
nothing recorded), ``dest:durable`` (``authoritative`` recorded, ACK not sent),
``dest:replied`` (ACK handed to the connection).
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("pynbd.migration")


def halt_point(step: str) -> None:
    if os.environ.get("PYNBD_MIGRATION_HALT_AT") != step:
        return
    log.warning("halting at handover step %s (PYNBD_MIGRATION_HALT_AT)", step)
    marker = os.environ.get("PYNBD_MIGRATION_HALT_FILE")
    if marker:
        with open(marker, "w", encoding="utf-8") as f:
            f.write(step + "\n")
    threading.Event().wait()
