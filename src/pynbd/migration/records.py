"""Durable migration records kept next to an image: ``IMAGE.pynbd-migration.json``.

A record is replaced atomically (temporary file, fsync, rename, fsync of the directory),
so after a crash it holds either the previous or the new content, never a mix. The
record is what makes the handover unambiguous across crashes:

source: ``{"role": "source", "state": "committing"|"stepped-down"|"resumed", "epoch": N,
"to": ...}``
destination: ``{"role": "destination", "state": "receiving"|"authoritative", "epoch": N,
"aborted": [epochs refused for good]}``
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

SUFFIX = ".pynbd-migration.json"


def record_path(image_path: str | None) -> str | None:
    return None if not image_path else image_path + SUFFIX


def read_record(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a migration record")
    return data


def write_record(path: str | None, record: dict[str, Any]) -> None:
    """Atomically and durably replace the record at ``path`` (no-op without a path)."""
    if path is None:
        return
    record = dict(record, updated=time.time())
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, json.dumps(record, sort_keys=True, indent=1).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def remove_record(path: str | None) -> None:
    if path is None:
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
