"""The TOML config file of ``pynbd serve --config FILE``.

::

    [server]
    bind = "127.0.0.1"        # address; omitted = loopback (127.0.0.1 and ::1)
    port = 10809
    socket = "/run/pynbd.sock" # optional Unix socket
    default_export = "disk"    # what the empty export name means (default: first export)

    [[export]]
    name = "disk"
    target = "/srv/disk.img"   # file, block device, memory:SIZE, rbd:POOL/IMAGE[@SNAP],
                               # python:PLUGIN.py[:CLASS], or a scheme a package registers
    description = "boot disk"
    read_only = false
    params = { key = "value" } # the plugin's KEY=VALUE parameters
    filters = ["cow", "rate:rate=10M"]  # outermost first, like --filter
    bitmaps = ["daily", {name = "hourly", granularity = "1M"}]  # dirty bitmaps (docs/backup.md)
    bitmap_dir = "/srv/disk.img.pynbd-bitmaps"  # where they are kept (default: next to a file)
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from typing import Any

from pynbd.backends.base import ConfigError
from pynbd.backends.loader import FilterSpec, parse_filter

__all__ = ["ConfigError", "ExportConfig", "ServeConfig", "load_config"]


@dataclass
class ExportConfig:
    name: str
    target: str
    description: str = ""
    read_only: bool = False
    #: the plugin's KEY=VALUE parameters
    params: dict[str, str] = field(default_factory=dict)
    #: filters in front of it, outermost first
    filters: list[FilterSpec] = field(default_factory=list)
    #: named dirty bitmaps it keeps (name, granularity in bytes)
    bitmaps: list[tuple[str, int]] = field(default_factory=list)
    #: where its bitmaps are stored (default: IMAGE.pynbd-bitmaps next to a file image)
    bitmap_dir: str | None = None


@dataclass
class ServeConfig:
    bind: str | None = None
    port: int | None = None
    socket: str | None = None
    default_export: str | None = None
    exports: list[ExportConfig] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def _get(table: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in table:
        return None
    value = table[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: {key} must be a {kind.__name__}, got {value!r}")
    return value


def _params(table: Any, where: str) -> dict[str, str]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table of KEY = VALUE")
    out = {}
    for k, v in table.items():
        if isinstance(v, bool):
            v = "true" if v else "false"
        if not isinstance(v, str | int | float):
            raise ConfigError(f"{where}: {k} must be a string or a number, got {v!r}")
        out[str(k)] = str(v)
    return out


def _filters(items: Any, where: str) -> list[FilterSpec]:
    """``filters = ["cow", "rate:rate=10M"]`` or ``[{name = "rate", rate = "10M"}]``."""
    if not isinstance(items, list):
        raise ConfigError(f"{where}: filters must be a list")
    out = []
    for i, item in enumerate(items):
        try:
            if isinstance(item, str):
                out.append(parse_filter(item))
            elif isinstance(item, dict) and isinstance(item.get("name"), str):
                rest = {k: v for k, v in item.items() if k != "name"}
                out.append(FilterSpec(item["name"], _params(rest, f"{where} filter #{i + 1}")))
            else:
                raise ConfigError("expected \"NAME[:KEY=VALUE,...]\" or {name = ..., ...}")
        except ConfigError as exc:
            raise ConfigError(f"{where}: filters #{i + 1}: {exc}") from None
    return out


def _bitmaps(items: Any, where: str) -> list[tuple[str, int]]:
    """``bitmaps = ["daily", {name = "hourly", granularity = "1M"}]``."""
    from pynbd.server.bitmaps import (
        DEFAULT_GRANULARITY,
        BitmapError,
        check_granularity,
        check_name,
    )

    if not isinstance(items, list):
        raise ConfigError(f"{where}: bitmaps must be a list")
    out: list[tuple[str, int]] = []
    for i, item in enumerate(items):
        try:
            if isinstance(item, str):
                out.append((check_name(item), DEFAULT_GRANULARITY))
            elif isinstance(item, dict) and set(item) <= {"name", "granularity"}:
                out.append((check_name(item.get("name")),
                            check_granularity(item.get("granularity", DEFAULT_GRANULARITY))))
            else:
                raise ConfigError('expected "NAME" or {name = ..., granularity = ...}')
        except (BitmapError, ValueError) as exc:
            raise ConfigError(f"{where}: bitmaps #{i + 1}: {exc}") from None
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: a bitmap name is given twice")
    return out


def load_config(path: str) -> ServeConfig:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    server = data.get("server", {})
    if not isinstance(server, dict):
        raise ConfigError(f"{path}: [server] must be a table")
    known_server = {"bind", "port", "socket", "default_export"}
    unknown = set(server) - known_server
    if unknown:  # e.g. tls or allow, which are command-line options: never ignore them
        raise ConfigError(f"{path} [server]: unknown keys {sorted(unknown)} "
                          f"(known: {', '.join(sorted(known_server))})")
    cfg = ServeConfig(
        bind=_get(server, "bind", str, f"{path} [server]"),
        port=_get(server, "port", int, f"{path} [server]"),
        socket=_get(server, "socket", str, f"{path} [server]"),
        default_export=_get(server, "default_export", str, f"{path} [server]"),
        extra={k: v for k, v in server.items() if k not in known_server},
    )
    exports = data.get("export", [])
    if not isinstance(exports, list):
        raise ConfigError(f"{path}: use [[export]] tables for exports")
    for i, e in enumerate(exports):
        where = f"{path} [[export]] #{i + 1}"
        if not isinstance(e, dict):
            raise ConfigError(f"{where}: must be a table")
        unknown = set(e) - {"name", "target", "description", "read_only", "params", "filters",
                            "bitmaps", "bitmap_dir"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        name = _get(e, "name", str, where)
        target = _get(e, "target", str, where)
        if name is None or target is None:
            raise ConfigError(f"{where}: name and target are required")
        cfg.exports.append(ExportConfig(
            name=name, target=target,
            description=_get(e, "description", str, where) or "",
            read_only=bool(_get(e, "read_only", bool, where) or False),
            params=_params(e.get("params", {}), f"{where} params"),
            filters=_filters(e.get("filters", []), where),
            bitmaps=_bitmaps(e.get("bitmaps", []), where),
            bitmap_dir=_get(e, "bitmap_dir", str, where)))
    if not cfg.exports:
        raise ConfigError(f"{path}: no [[export]] defined")
    return cfg
