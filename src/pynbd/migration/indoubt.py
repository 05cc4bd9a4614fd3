"""A handover in doubt, on the source: COMMIT went out and no answer came back (or
the source restarted with a ``committing`` record). Only the destination knows whether
it took over; the source asks it until it says, and its clients stay paused meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING

from pynbd.migration.states import MirrorResult, MirrorState
from pynbd.migration.transport import RejectedError, TransportError

if TYPE_CHECKING:
    from pynbd.migration.mirror import Mirror

log = logging.getLogger("pynbd.migration")


def resolve_in_doubt(m: Mirror, epoch: int) -> bool:
    """Ask the destination whether epoch N committed; never returns before it knows.

    Clients stay paused throughout. After ``max_attempts`` failed queries the result is
    ``in-doubt`` (``mirror --wait`` exits with ExitCode.IN_DOUBT) but the queries go on."""
    m.state = MirrorState.IN_DOUBT
    m.authoritative = False
    delay = 0.2
    while True:
        m.outcome_queries += 1
        t = m.factory()
        try:
            t.connect_for_query(m.size)
            committed = t.query_outcome(epoch)
        except (TransportError, RejectedError, OSError) as exc:
            m.error = f"outcome of epoch {epoch} unknown: {exc}"
            if m.outcome_queries >= m.opts.max_attempts and m.result is None:
                m.result = MirrorResult.IN_DOUBT
                log.error("migration in doubt after %d queries: clients stay paused; "
                          "still asking %s", m.outcome_queries, m.opts.to)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        finally:
            with contextlib.suppress(Exception):
                t.close()
        m.result = None
        m.error = ""
        if committed:
            log.info("destination says epoch %d committed: stepping down", epoch)
            return True
        log.warning("destination says epoch %d did not commit: this copy stays authoritative",
                    epoch)
        return False
