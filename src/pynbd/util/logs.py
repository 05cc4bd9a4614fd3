"""Logging for the daemons: human lines or JSON lines, one setup for every command.

JSON lines carry ``time`` (RFC 3339, UTC), ``level``, ``pid``, ``logger``, ``message``
and whatever structured fields the call site passed with ``extra={"fields": {...}}``
(the access log passes ``event``, ``peer``, ``export``, ``worker``...), so a log
collector can filter on them without parsing the message.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

HUMAN_FORMAT = "%(asctime)s pynbd[%(process)d] %(levelname)s %(message)s"
FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        t = record.created
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"
        out: dict[str, Any] = {
            "time": stamp,
            "level": record.levelname.lower(),
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for k, v in fields.items():
                out.setdefault(str(k), v)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=True)


def configure(level: int, fmt: str = "text", quiet_server: bool = False) -> None:
    """Log to stderr at ``level`` in ``fmt`` ("text" or "json"). ``quiet_server`` keeps
    the per-connection chatter of ``pynbd.server`` at WARNING (the access log's one
    line per connect/disconnect stays)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(HUMAN_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    if quiet_server:
        logging.getLogger("pynbd.server").setLevel(max(level, logging.WARNING))


def fields(**kw: Any) -> dict[str, Any]:
    """``log.info(msg, ..., extra=fields(peer=..., export=...))``."""
    return {"fields": kw}
