"""Carrying out one handover on the source: the effects of the pure state machine
(:mod:`pynbd.migration.handover`) against the export's I/O gate, the transport, the
record file and the mirror's dirty map, and reporting back what happened.

:func:`hand_over` is called by the mirror's copy loop once what is left fits the
downtime budget; it returns True when the destination took over, False to copy on, and
raises TransportError when the attempt failed (the mirror retries). The order of the
effects is the protocol and is the state machine's to decide; nothing here reorders them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from pynbd.migration import handover as ho
from pynbd.migration.faults import halt_point
from pynbd.migration.indoubt import resolve_in_doubt
from pynbd.migration.records import write_record
from pynbd.migration.states import MirrorResult, MirrorState
from pynbd.migration.transport import InDoubtError, RejectedError, Transport, TransportError
from pynbd.server.exports import Export

if TYPE_CHECKING:
    from pynbd.migration.mirror import Mirror

log = logging.getLogger("pynbd.migration")


def hand_over(m: Mirror, t: Transport) -> bool:
    """Hand over (True), or go back to copying (False); TransportError: this
    attempt failed. The decisions are the state machine's; this carries them out."""
    h = ho.Handover(m.opts.to, m.size, m.epoch_base, t.description,
                    verified=t.supports_commit, pause_timeout=m.opts.pause_timeout,
                    commit_fields={"psk_file": m.opts.psk_file,
                                   "secure": m.opts.secure,
                                   "insecure": m.opts.insecure})
    m.handover_ms = h.phases
    effects = deque(h.start(time.monotonic()))
    while effects:
        effect = effects.popleft()
        m.state, m.epoch, m.authoritative = h.state, h.epoch, h.authoritative
        if isinstance(effect, ho.Completed | ho.CopyOn | ho.Retry):
            return _ends(m, h, effect)
        effects.extend(_carry_out(m, h, t, effect))
    raise AssertionError("the handover ended without an outcome")  # pragma: no cover


def _carry_out(m: Mirror, h: ho.Handover, t: Transport, effect: ho.Effect) -> list[ho.Effect]:
    """One effect; the events it leads to, as more effects."""
    now = time.monotonic
    if isinstance(effect, ho.Pause):
        ok = m.gate.pause(effect.timeout)
        m.paused_by_us = ok
        return h.paused(ok, now(), m.dirty.dirty_bytes)
    if isinstance(effect, ho.FinalCopy):
        m.final_copy(t)
        return h.final_copied(now())
    if isinstance(effect, ho.Flush):
        t.flush()
        digest = m.sent.digest() if m.sent is not None else ""
        last = t.last_epoch() if t.supports_commit else 0
        return h.flushed(now(), last, digest)
    if isinstance(effect, ho.Commit):
        return _commit(h, t, effect)
    if isinstance(effect, ho.AskOutcome):
        return h.outcome(resolve_in_doubt(m, effect.epoch), now())
    do_effect(m, effect)
    return []


def do_effect(m: Mirror, effect: ho.Effect) -> None:
    """An effect that needs no answer (also used by the restart of a handover in doubt)."""
    if isinstance(effect, ho.Record):
        write_record(m.record, dict(effect.fields))
    elif isinstance(effect, ho.Halt):
        halt_point(effect.point)
    elif isinstance(effect, ho.Resume):
        m.gate.resume()
        m.paused_by_us = False
    elif isinstance(effect, ho.StepDown):
        step_down_export(m.export, effect.reason, m.on_step_down, m)
        m.paused_by_us = False
    elif isinstance(effect, ho.MarkAllDirty):
        m.dirty.mark_all()
    elif isinstance(effect, ho.CloseTransport):
        t, m.transport = m.transport, None
        if t is not None:
            with contextlib.suppress(Exception):
                t.close(release=effect.release)
    else:  # pragma: no cover
        raise AssertionError(f"unknown effect {effect!r}")


def _commit(h: ho.Handover, t: Transport, c: ho.Commit) -> list[ho.Effect]:
    try:
        t.commit(c.size, c.epoch, c.digest, lambda: halt_point("source:commit-sent"))
    except RejectedError as exc:
        # the destination definitely did not take over: we stay authoritative
        log.error("destination refused COMMIT %d: %s; sending everything again",
                  c.epoch, exc)
        return h.refused(str(exc))
    except InDoubtError as exc:
        log.warning("COMMIT %d: outcome unknown (%s): asking the destination",
                    c.epoch, exc)
        return h.in_doubt(str(exc))
    return h.committed(time.monotonic())


def _ends(m: Mirror, h: ho.Handover, end: ho.Completed | ho.CopyOn | ho.Retry) -> bool:
    m.epoch_base = h.epoch_base
    if isinstance(end, ho.CopyOn):
        log.info("%s; copying on", end.reason)
        return False
    if isinstance(end, ho.Retry):
        raise TransportError(end.reason)
    m.pause_ms = h.pause_ms
    mark_completed(m)
    return True


def mark_completed(m: Mirror) -> None:
    """The destination took over: unlink the image if asked, report completion."""
    if m.opts.unlink and m.image_path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(m.image_path)
        log.info("unlinked %s", m.image_path)
    m.state = MirrorState.COMPLETED
    m.result = MirrorResult.COMPLETED
    log.info("migration to %s completed (epoch %d%s)", m.opts.to, m.epoch,
             "" if m.pause_ms is None else f", pause {m.pause_ms} ms")


def step_down_export(export: Export, reason: str,
                     callback: Callable[[Mirror], None] | None = None,
                     mirror: Mirror | None = None) -> None:
    assert export.gate is not None
    export.gate.step_down(reason)
    if callback is not None and mirror is not None:
        callback(mirror)
