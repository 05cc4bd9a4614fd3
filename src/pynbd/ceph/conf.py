"""Ceph configuration the way Ceph's own tools read it: ``ceph.conf`` sections and
options (``mon_host``, ``keyring``, ``auth_client_required``, ...), monitor addresses,
and where keyrings are looked for."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from pynbd.msgr2.errors import UsageError


@dataclass(frozen=True)
class CephConf:
    path: Path
    sections: dict[str, dict[str, str]]

    def get(self, name: str, key: str) -> str | None:
        """Option ``key`` for entity ``name`` (``client.admin``): [client.admin], then
        [client], then [global]; ``mon host`` and ``mon_host`` are the same option."""
        key = _norm(key)
        kind = name.split(".", 1)[0]
        for sect in (name, kind, "global"):
            v = self.sections.get(sect, {}).get(key)
            if v is not None:
                return v
        return None


def _norm(key: str) -> str:
    return re.sub(r"[\s_]+", "_", key.strip().lower())


def read_ceph_conf(path: str | os.PathLike[str]) -> CephConf:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read Ceph config {p}: {exc.strerror or exc}") from None
    sections: dict[str, dict[str, str]] = {}
    cur: dict[str, str] | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise UsageError(f"{p}:{lineno}: malformed section header {line!r}")
            cur = sections.setdefault(line[1:-1].strip(), {})
            continue
        k, sep, v = line.partition("=")
        if not sep:
            raise UsageError(f"{p}:{lineno}: expected 'key = value', got {line!r}")
        if cur is None:
            cur = sections.setdefault("global", {})
        v = re.split(r"\s[#;]", v, maxsplit=1)[0].strip().strip('"')
        cur[_norm(k)] = v
    return CephConf(p, sections)


def parse_mon_host(value: str, default_port: int = 3300) -> list[tuple[str, int]]:
    """msgr2 addresses from a mon_host value: ``[v2:IP:PORT,v1:IP:PORT] ...``, ``IP``,
    ``IP:PORT``, ``v2:IP:PORT``; v1-only entries are skipped."""
    out: list[tuple[str, int]] = []
    for group in re.findall(r"\[[^\]]*\]|[^\s,;\[\]]+", value):
        entries = group.strip("[]").split(",") if group.startswith("[") else [group]
        v2 = [e.strip() for e in entries if e.strip().startswith("v2:")]
        plain = [e.strip() for e in entries if not e.strip().startswith(("v1:", "v2:"))]
        for e in v2 or plain:
            addr = e[3:] if e.startswith("v2:") else e
            addr = addr.split("/", 1)[0]
            m = re.fullmatch(r"\[?([0-9a-fA-F:.]+?)\]?(?::(\d+))?", addr)
            if not m:
                raise UsageError(f"cannot parse monitor address {e!r} in mon_host")
            port = int(m.group(2)) if m.group(2) else default_port
            if not 0 < port < 65536:
                raise UsageError(f"bad port in monitor address {e!r}")
            out.append((m.group(1), port))
    return out


def default_keyring_paths(cluster: str, name: str) -> list[str]:
    return [f"/etc/ceph/{cluster}.{name}.keyring", f"/etc/ceph/{cluster}.keyring",
            "/etc/ceph/keyring", "/etc/ceph/keyring.bin"]


def expand_meta(value: str, cluster: str, name: str) -> str:
    kind, _, ident = name.partition(".")
    return (value.replace("$cluster", cluster).replace("$name", name).replace("$type", kind)
            .replace("$id", ident))
