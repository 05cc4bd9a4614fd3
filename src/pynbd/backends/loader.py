"""Turning ``TARGET [KEY=VALUE ...]`` and ``--filter NAME[:KEY=VALUE,...]`` into backends.

A TARGET is ``SCHEME:REST`` for a registered scheme, otherwise a file or block device.
Schemes come from the entry-point group ``pynbd.backends`` (the built-in ``file``,
``memory`` and ``rbd`` register there too, so installing a package adds a scheme), plus
``python:PATH.py[:CLASS]`` / ``python:package.module[:CLASS]`` for a plugin that is not
installed. Filters come from the group ``pynbd.filters`` the same way. An entry point
names a :class:`~pynbd.backends.base.Backend` subclass (opened with its
``open_target``) or a factory ``f(target, params, read_only) -> Backend``.
"""

from __future__ import annotations

import errno
import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

from pynbd.backends.base import (
    API_VERSION,
    Backend,
    BackendError,
    ConfigError,
    Param,
    ThreadModel,
    parse_params,
)

BACKEND_GROUP = "pynbd.backends"
FILTER_GROUP = "pynbd.filters"

#: used when pynbd runs from a source tree without installed metadata
BUILTIN_BACKENDS = {
    "file": "pynbd.backends.file:FileBackend",
    "memory": "pynbd.backends.memory:MemoryBackend",
    "rbd": "pynbd.backends.loader:open_rbd",
    "backup": "pynbd.backends.backup_chain:BackupChainBackend",
}
BUILTIN_FILTERS = {
    "blocksize": "pynbd.filters.blocksize:BlocksizeFilter",
    "cow": "pynbd.filters.cow:CowFilter",
    "delay": "pynbd.filters.delay:DelayFilter",
    "error": "pynbd.filters.error:ErrorFilter",
    "log": "pynbd.filters.log:LogFilter",
    "rate": "pynbd.filters.rate:RateFilter",
    "readonly": "pynbd.filters.readonly:ReadonlyFilter",
    "stats": "pynbd.filters.stats:StatsFilter",
}

Factory = Callable[[str, dict[str, str], bool], Backend]


@dataclass(frozen=True)
class FilterSpec:
    name: str
    params: dict[str, str]

    def describe(self) -> str:
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.params.items())


def parse_kv(items: list[str], where: str) -> dict[str, str]:
    """``["size=64M", "seed=1"]`` -> dict; a word without ``=`` is an error."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{where}: expected KEY=VALUE, got {item!r}")
        out[key.strip()] = value
    return out


def parse_filter(text: str) -> FilterSpec:
    """``NAME`` or ``NAME:KEY=VALUE,KEY=VALUE`` (the --filter syntax)."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"--filter {text!r}: expected NAME[:KEY=VALUE,...]")
    items = [i for i in rest.split(",") if i.strip()] if rest else []
    return FilterSpec(name, parse_kv(items, f"filter {name}"))


def _entry(group: str, name: str, builtin: dict[str, str]) -> Any:
    for ep in entry_points(group=group):
        if ep.name == name:
            try:
                return ep.load()
            except Exception as exc:
                raise ConfigError(f"{group} entry point {name!r} ({ep.value}) cannot be "
                                  f"loaded: {type(exc).__name__}: {exc}") from None
    ref = builtin.get(name)
    if ref is None:
        return None
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def known_schemes() -> list[str]:
    names = {ep.name for ep in entry_points(group=BACKEND_GROUP)} | set(BUILTIN_BACKENDS)
    return sorted(names | {"python"})


def known_filters() -> list[str]:
    return sorted({ep.name for ep in entry_points(group=FILTER_GROUP)} | set(BUILTIN_FILTERS))


# --- python: plugins ------------------------------------------------------------------

def _split_class(spec: str) -> tuple[str, str | None]:
    head, sep, tail = spec.rpartition(":")
    if sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", tail):
        return head, tail
    return spec, None


def _import_plugin(where: str) -> ModuleType:
    if where.endswith(".py") or os.sep in where:
        path = os.path.abspath(where)
        if not os.path.isfile(path):
            raise ConfigError(f"python plugin {where}: no such file")
        name = "pynbd_plugin_" + re.sub(r"\W", "_", path)
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"python plugin {where}: cannot be loaded as a module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except SyntaxError as exc:
            raise ConfigError(f"python plugin {where}:{exc.lineno}: syntax error: "
                              f"{exc.msg}") from None
        except Exception as exc:
            raise ConfigError(f"python plugin {where}: importing it failed: "
                              f"{type(exc).__name__}: {exc}") from None
        return module
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"python plugin {where}: no module named {exc.name!r}") from None
    except Exception as exc:
        raise ConfigError(f"python plugin {where}: importing it failed: "
                          f"{type(exc).__name__}: {exc}") from None


def load_plugin_class(spec: str) -> type[Backend]:
    """The Backend subclass named by ``PATH.py[:CLASS]`` or ``module[:CLASS]``."""
    where, cls_name = _split_class(spec)
    if not where:
        raise ConfigError("python: needs a plugin, e.g. python:plugin.py or "
                          "python:package.module:Class")
    module = _import_plugin(where)
    if cls_name is not None:
        cls = getattr(module, cls_name, None)
        if not (inspect.isclass(cls) and issubclass(cls, Backend)):
            raise ConfigError(f"python plugin {where}: {cls_name} is not a "
                              "pynbd.backends.Backend subclass")
        return cls
    # the module's own public Backend subclasses (``_Helper`` classes, e.g. the objects
    # open_connection returns, and imported ones do not count)
    found = [c for c in vars(module).values()
             if inspect.isclass(c) and issubclass(c, Backend) and c.__module__ == module.__name__
             and not c.__name__.startswith("_")]
    if not found:
        raise ConfigError(f"python plugin {where}: defines no pynbd.backends.Backend subclass")
    if len(found) > 1:
        names = ", ".join(sorted(c.__name__ for c in found))
        raise ConfigError(f"python plugin {where}: defines several backends ({names}): "
                          f"name one, e.g. python:{where}:{found[0].__name__}")
    return found[0]


def _check_api(cls: type[Backend], what: str) -> None:
    v = getattr(cls, "api_version", API_VERSION)
    if not isinstance(v, int) or v > API_VERSION or v < 1:
        raise ConfigError(f"{what} was written for plugin API version {v}; this pynbd "
                          f"implements version {API_VERSION}")


# --- opening ---------------------------------------------------------------------------

def _open_with(obj: Any, rest: str, params: dict[str, str], read_only: bool,
               what: str) -> Backend:
    if inspect.isclass(obj) and issubclass(obj, Backend):
        _check_api(obj, what)
        backend = obj.open_target(rest, params, read_only)
    elif callable(obj):
        backend = obj(rest, params, read_only)
    else:
        raise ConfigError(f"{what} is neither a Backend subclass nor a factory")
    if not isinstance(backend, Backend):
        raise ConfigError(f"{what} returned {type(backend).__name__}, not a Backend")
    _check_backend(backend, what)
    return backend


def _check_backend(backend: Backend, what: str) -> None:
    """What the server takes from a plugin's attributes must make sense."""
    size = backend.size
    if type(size) is not int or size < 0:
        backend.close()
        raise ConfigError(f"{what}: size must be a whole number of bytes >= 0, "
                          f"not {size!r}")
    if not isinstance(backend.thread_model, ThreadModel):
        backend.close()
        raise ConfigError(f"{what}: thread_model must be a pynbd.backends.ThreadModel, "
                          f"not {backend.thread_model!r}")


def open_target(target: str, params: dict[str, str] | None = None,
                read_only: bool = False) -> Backend:
    """Open ``TARGET`` with its ``KEY=VALUE`` parameters (plugins raise ConfigError for
    bad parameters and BackendError when the storage cannot be opened)."""
    params = dict(params or {})
    scheme, sep, rest = target.partition(":")
    obj: Any = None
    what = target
    if sep and scheme == "python":
        cls = load_plugin_class(rest)
        where, cls_name = _split_class(rest)
        if where.endswith(".py") or os.sep in where:
            target = "python:" + os.path.abspath(where) + (f":{cls_name}" if cls_name else "")
        obj, rest, what = cls, "", f"python plugin {cls.__name__}"
    elif sep and re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
        obj = _entry(BACKEND_GROUP, scheme, BUILTIN_BACKENDS)
        what = f"{scheme}: backend"
    if obj is None:  # a plain path (or an unknown scheme: a file name with a colon)
        obj = _entry(BACKEND_GROUP, "file", BUILTIN_BACKENDS)
        rest = target[len("file:"):] if target.startswith("file:") else target
        what = "file backend"
    try:
        backend = _open_with(obj, rest, params, read_only, what)
    except (ConfigError, BackendError):
        raise
    except Exception as exc:  # the plugin's own __init__ failed: say so, no traceback
        raise BackendError(errno.EIO, f"{what} failed to open: {type(exc).__name__}: "
                                      f"{exc}") from None
    backend._opened_as = {"target": target, "params": params,  # type: ignore[attr-defined]
                          "read_only": read_only}
    return backend


def open_filter(spec: FilterSpec, below: Backend,
                state: dict[str, Any] | None = None) -> Backend:
    """Put filter ``spec`` on ``below``; in a worker process ``state`` is what the
    supervisor's instance passed on (``Filter.worker_state``)."""
    obj = _entry(FILTER_GROUP, spec.name, BUILTIN_FILTERS)
    if obj is None:
        raise ConfigError(f"unknown filter {spec.name!r} (known: {', '.join(known_filters())})")
    from pynbd.filters.base import Filter

    if not (inspect.isclass(obj) and issubclass(obj, Filter)):
        raise ConfigError(f"filter {spec.name!r} is not a pynbd.filters.Filter subclass")
    _check_api(obj, f"filter {spec.name}")
    values = parse_params(f"filter {spec.name}", obj.params, spec.params)
    try:
        f = obj(below, **values) if state is None else \
            obj.from_worker_state(below, state, **values)
    except (ConfigError, BackendError):
        raise
    except Exception as exc:
        raise BackendError(errno.EIO, f"filter {spec.name} failed to start: "
                                      f"{type(exc).__name__}: {exc}") from None
    f.spec = spec
    return f


def open_stack(target: str, params: dict[str, str] | None, filters: list[FilterSpec],
               read_only: bool = False) -> Backend:
    """The plugin with its filters stacked on top, first filter outermost (nbdkit's
    order: ``--filter a --filter b`` puts a in front of b in front of the plugin)."""
    top = open_target(target, params, read_only)
    try:
        for spec in reversed(filters):
            top = open_filter(spec, top)
    except BaseException:
        top.close()
        raise
    return top


# --- built-in factories -------------------------------------------------------------

def open_rbd(target: str, params: dict[str, str], read_only: bool) -> Backend:
    """``rbd:POOL/IMAGE[@SNAP]`` with ``conf=``, ``name=`` (client), ``keyring=``."""
    from pynbd.backends.rbd import RbdBackend

    values = parse_params("rbd", RBD_PARAMS, params)
    # ``target`` is what follows the scheme; RbdBackend parses the whole rbd: TARGET
    return RbdBackend.from_target(f"rbd:{target}", conf=values["conf"], name=values["name"],
                                  keyring=values["keyring"], read_only=read_only)


def _opt_str(text: str) -> str | None:
    return text or None


RBD_PARAMS = {
    "conf": Param("Ceph config file (default $CEPH_CONF or /etc/ceph/ceph.conf)",
                  _opt_str, None),
    "name": Param("Ceph client name (default client.admin)", _opt_str, None),
    "keyring": Param("Ceph keyring file", _opt_str, None),
}
