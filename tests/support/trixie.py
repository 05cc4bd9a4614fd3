"""Debian 13 ("trixie") NBD peers, run from a chroot tree, for the interop tests.

Debian 12's qemu 7.2, libnbd 1.14 and nbdkit 1.32 do not speak extended headers;
Debian 13's qemu 10, libnbd 1.22 (nbdinfo, nbdcopy, python3-libnbd) and nbdkit 1.42
are today's peers. ``scripts/provision-trixie.sh`` (run by ``scripts/test.sh``) builds
the tree once with debootstrap; a tree that is missing here is an error, never a skip.

Every command runs in a private mount namespace (``unshare --mount``) where ``/proc``,
``/dev`` (read-only bind), ``/sys`` and the host's ``/tmp`` (same path both sides:
images and Unix sockets live there) are mounted into the tree. The mounts belong to
that one process tree and vanish with it: nothing is left mounted on the host, and
concurrent test runs sharing the tree cannot unmount each other's ``/proc``. The
chroot shares the host's network namespace, so its programs reach pynbd on
127.0.0.1 and vice versa.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.support.nbd_servers import Server, wait_ready
from tests.support.net import activation_argv, listening_socket
from tests.support.processes import Process

ROOT = Path(os.environ.get("PYNBD_TRIXIE_ROOT", "/var/cache/pynbd-trixie"))
STAMP = ".pynbd-provisioned"
PROVISION = Path(__file__).resolve().parents[2] / "scripts" / "provision-trixie.sh"
#: the host paths visible inside the tree at the same place
SHARED = ("/tmp",)
#: environment of chroot programs (the host's PYTHONPATH etc. would confuse them)
BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root", "LANG": "C.UTF-8", "TMPDIR": "/tmp"}

_ENTER = r"""
set -eu
root="$1"; shift
mount -t proc proc "$root/proc"
mount --bind /dev "$root/dev"
mount -o remount,bind,ro "$root/dev"
mount -t sysfs sysfs "$root/sys"
for d in $PYNBD_SHARED; do
  mkdir -p "$root$d"
  mount --bind "$d" "$root$d"
done
exec chroot "$root" env -i "$@"
"""


def root() -> Path:
    """The provisioned tree; RuntimeError (the test fails) if it is not there."""
    if not (ROOT / STAMP).is_file():
        raise RuntimeError(
            f"Debian 13 peers are not provisioned in {ROOT}: run {PROVISION} "
            "(scripts/test.sh does it) as root")
    if os.geteuid() != 0:
        raise RuntimeError("running Debian 13 peers needs root (mount namespaces, chroot)")
    if shutil.which("unshare") is None:
        raise RuntimeError("unshare (util-linux) is missing")
    return ROOT


def argv(cmd: Sequence[str], env: Mapping[str, str] | None = None) -> list[str]:
    """The host argv that runs ``cmd`` inside the tree."""
    r = root()
    full_env = {**BASE_ENV, **(env or {})}
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", _ENTER, "sh",
            str(r), *(f"{k}={v}" for k, v in full_env.items()), *cmd]


def _host_env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", BASE_ENV["PATH"]), "PYNBD_SHARED": " ".join(SHARED)}


def run(cmd: Sequence[str], *, env: Mapping[str, str] | None = None, check: bool = True,
        timeout: float = 300, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in the tree; with ``check`` a non-zero exit raises with its output."""
    p = subprocess.run(argv(cmd, env), env=_host_env(), capture_output=True, text=True,
                       timeout=timeout, input=None if input is None else input.decode(),
                       check=False)
    if check and p.returncode != 0:
        what = " ".join(c if len(c) < 80 else c[:60] + "..." for c in cmd)
        raise AssertionError(f"{what} (Debian 13) exited {p.returncode}\n"
                             f"stdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}")
    return p


def popen(cmd: Sequence[str], *, env: Mapping[str, str] | None = None,
          **kw: object) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in the tree (its pid is the program's own: every step execs)."""
    return subprocess.Popen(argv(cmd, env), env=_host_env(), **kw)  # type: ignore[call-overload, no-any-return]


def python(script: str, *args: str, env: Mapping[str, str] | None = None,
           timeout: float = 300) -> object:
    """Run a Python 3.13 script (libnbd 1.22's bindings) in the tree; it prints one
    JSON document as its last line of stdout, returned decoded. A failing script
    fails the test with its traceback."""
    p = run(["python3", "-c", script, *args], env=env, timeout=timeout)
    lines = [x for x in p.stdout.splitlines() if x.strip()]
    if not lines:
        raise AssertionError(f"script printed nothing; stderr:\n{p.stderr[-4000:]}")
    return json.loads(lines[-1])


def version(program: str) -> str:
    return run([program, "--version"]).stdout.splitlines()[0].strip()


# --- servers inside the tree ----------------------------------------------------------

def _spawn(kind: str, cmd: Sequence[str], workdir: Path, transport: str,
           export: str, sock: str | None) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    listener = None
    host: str | None = None
    port: int | None = None
    if transport == "unix":
        full = list(cmd)
    else:
        # systemd socket activation, run by the tree's python3: the test binds port 0
        # itself (no free-port race) and the server inherits it as fd 3
        host = "127.0.0.1"
        listener, port = listening_socket(host)
        full = activation_argv("python3", listener.fileno(), list(cmd))
    try:
        # every step execs: the process's pid is the program's own
        proc = Process(argv(full), name=kind, cwd=workdir, env=_host_env(),
                       pass_fds=() if listener is None else (listener.fileno(),))
    finally:
        if listener is not None:
            listener.close()  # the server owns it now
    srv = Server(kind, proc, workdir, transport, export, host, port, sock, None)
    wait_ready(srv)
    return srv


def start_qemu_nbd(workdir: Path, image: Path, *, fmt: str = "raw", transport: str = "tcp",
                   export: str = "", read_only: bool = False,
                   extra: Sequence[str] = ()) -> Server:
    """qemu-nbd 10 (extended headers in its server) serving ``image`` (under /tmp)."""
    sock = str(workdir / "qemu-nbd.sock") if transport == "unix" else None
    cmd = ["qemu-nbd", "-f", fmt, "-t", "-e", "16", "-x", export]
    if sock:
        cmd += ["-k", sock]
    if read_only:
        cmd.append("-r")
    cmd += [*extra, str(image)]
    return _spawn("qemu-nbd-13", cmd, workdir, transport, export, sock)


def start_nbdkit(workdir: Path, plugin: str = "memory", plugin_args: Sequence[str] = (
        "size=64M",), *, transport: str = "tcp", extra: Sequence[str] = ()) -> Server:
    """nbdkit 1.42 (no extended headers in its server)."""
    sock = str(workdir / "nbdkit.sock") if transport == "unix" else None
    cmd = ["nbdkit", "-f"]
    if sock:
        cmd += ["-U", sock]
    cmd += [*extra, plugin, *plugin_args]
    return _spawn("nbdkit-13", cmd, workdir, transport, "", sock)


def check_shared(path: Path) -> Path:
    """``path`` must be visible inside the tree (under a shared directory)."""
    p = path.resolve()
    if not any(str(p) == d or str(p).startswith(d + "/") for d in SHARED):
        raise ValueError(f"{p} is not under {SHARED}: the chroot cannot see it")
    return p


__all__ = ["ROOT", "argv", "check_shared", "popen", "python", "root", "run",
           "start_nbdkit", "start_qemu_nbd", "version"]
