"""Ceph keyring files: the secret key of an entity (``[client.admin]``, ``key = ...``)."""

from __future__ import annotations

import os
from pathlib import Path

from pynbd.msgr2.auth import CryptoKey
from pynbd.msgr2.errors import UsageError


def read_keyring(path: str | os.PathLike[str], name: str) -> CryptoKey:
    """The key of entity ``name`` (e.g. ``client.admin``) in a Ceph keyring file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read keyring {p}: {exc.strerror or exc}") from None
    section = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]").strip()
            continue
        k, sep, v = line.partition("=")
        if sep and section == name and k.strip() == "key":
            try:
                return CryptoKey.from_base64(v.strip().strip('"'))
            except UsageError as exc:
                raise UsageError(f"{p}:{lineno}: {exc}") from None
    raise UsageError(f"keyring {p} has no key for {name}")
