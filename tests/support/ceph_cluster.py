"""A real single-node Ceph cluster (one mon, optionally one memstore OSD) for tests.

Everything lives under ``workdir``: config, keyrings, mon and osd data, logs, admin sockets,
pid files. Loopback only, msgr2 only, the mon port is picked by binding port 0. Nothing is
read from or written to /etc/ceph or /var.

    cluster = CephCluster(tmp_path / "ceph", auth="cephx")
    cluster.start()          # blocks until pool "rbd" answers
    subprocess.run(["rados", "-p", "rbd", "ls"], env=cluster.env)
    cluster.stop()

The daemons are started with PR_SET_PDEATHSIG=SIGKILL, so they die with the process (thread)
that started them even if ``stop()` is never reached; ``stop()`` is also registered with
atexit.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

from tests.support.net import free_port

CEPH_BINARIES = ("monmaptool", "ceph-authtool", "ceph-mon", "ceph-osd", "ceph", "rados")
INSTALL_HINT = (
    "apt-get install ceph-mon ceph-osd ceph-common python3-rados python3-rbd "
    "(Debian; the Python bindings are built for /usr/bin/python3)"
)

_PR_SET_PDEATHSIG = 1


def missing_binaries() -> list[str]:
    """Names of the Ceph programs this module needs that are not on PATH."""
    return [b for b in CEPH_BINARIES if shutil.which(b) is None]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:
        pass


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text[-lines:])


class CephCluster:
    """One ceph-mon (+ one ceph-osd on memstore, pool ``rbd``) under ``workdir``."""

    def __init__(self, workdir: Path, auth: str = "none", osd: bool = True,
                 memstore_bytes: str = "4G", start_timeout: float = 180.0) -> None:
        if auth not in ("none", "cephx"):
            raise ValueError(f"auth must be 'none' or 'cephx', not {auth!r}")
        self.workdir = Path(workdir).resolve()
        self.auth = auth
        self.with_osd = osd
        self.memstore_bytes = memstore_bytes
        self.start_timeout = start_timeout
        self.fsid = str(uuid.uuid4())
        self.conf_path = self.workdir / "ceph.conf"
        self.keyring_path: Path | None = self.workdir / "ceph.client.admin.keyring"
        self.mon_keyring_path = self.workdir / "mon.keyring"
        self.monmap_path = self.workdir / "monmap"
        self.mon_dir = self.workdir / "mon" / "ceph-a"
        self.osd_dir = self.workdir / "osd" / "ceph-0"
        self.log_dir = self.workdir / "log"
        self.run_dir = self.workdir / "run"
        self.mon_addr: tuple[str, int] = ("127.0.0.1", 0)
        self.osd_addr: tuple[str, int] | None = None
        self.osd_uuid = str(uuid.uuid4())
        self.env: dict[str, str] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._started = False

    # ---------------------------------------------------------------- helpers
    @property
    def mon_host(self) -> str:
        return f"[v2:{self.mon_addr[0]}:{self.mon_addr[1]}]"

    @property
    def admin_key(self) -> str | None:
        """The base64 cephx secret of client.admin (also generated for auth none)."""
        if self.keyring_path is None or not self.keyring_path.exists():
            return None
        for line in self.keyring_path.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "key":
                return value.strip()
        return None

    @property
    def daemon_logs(self) -> dict[str, Path]:
        return {
            "mon.a": self.log_dir / "ceph-mon.a.log",
            "osd.0": self.log_dir / "ceph-osd.0.log",
        }

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for name, path in self.daemon_logs.items():
            if path.exists():
                parts.append(f"--- {path} (last {lines} lines) ---\n{_tail(path, lines)}")
            out = self.log_dir / f"{name}.stdout"
            if out.exists() and out.stat().st_size:
                parts.append(f"--- {out} ---\n{_tail(out, lines)}")
        return "\n".join(parts) or "<no daemon logs>"

    def _fail(self, what: str) -> RuntimeError:
        return RuntimeError(f"Ceph cluster in {self.workdir}: {what}\n{self.log_tail()}")

    def run(self, *args: str, timeout: float = 60.0, check: bool = True,
            input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        """Run a Ceph tool (``ceph``, ``rados``, ``rbd`` ...) against this cluster."""
        try:
            cp = subprocess.run(list(args), env=self.env, capture_output=True, text=True,
                                timeout=timeout, input=input.decode() if input else None,
                                cwd=self.workdir)
        except subprocess.TimeoutExpired as exc:
            raise self._fail(f"{' '.join(args)} timed out after {timeout} s") from exc
        if check and cp.returncode != 0:
            raise self._fail(f"{' '.join(args)} failed ({cp.returncode}): "
                             f"{cp.stderr.strip()} {cp.stdout.strip()}")
        return cp

    def ceph(self, *args: str, timeout: float = 60.0,
             check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("ceph", "--connect-timeout", "15", *args, timeout=timeout, check=check)

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.log_dir / f"{name}.stdout", "wb")
        try:
            proc = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, cwd=self.workdir,
                                    preexec_fn=_die_with_parent)
        finally:
            out.close()
        self._procs[name] = proc

    def _check_alive(self, name: str) -> None:
        proc = self._procs.get(name)
        if proc is not None and proc.poll() is not None:
            raise self._fail(f"{name} exited with status {proc.returncode}")

    # ----------------------------------------------------------------- config
    def _write_conf(self) -> None:
        w = self.workdir
        auth = self.auth
        conf = f"""\
[global]
fsid = {self.fsid}
mon_host = {self.mon_host}
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_msgr1 = false
ms_bind_msgr2 = true
ms_bind_ipv4 = true
ms_bind_ipv6 = false
auth_cluster_required = {auth}
auth_service_required = {auth}
auth_client_required = {auth}
run_dir = {self.run_dir}
crash_dir = {w}/crash
log_file = {self.log_dir}/$cluster-$name.log
mon_cluster_log_file = {self.log_dir}/$cluster.log
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_crush_chooseleaf_type = 0
osd_pool_default_pg_autoscale_mode = off
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
mon_data_avail_warn = 2
mon_data_avail_crit = 1

[client]
keyring = {self.keyring_path}
log_file = {self.log_dir}/clients.log
admin_socket =

[mon]
mon_data = {w}/mon/$cluster-$id
keyring = $mon_data/keyring
admin_socket = {self.run_dir}/$cluster-$name.asok
pid_file = {self.run_dir}/$cluster-$name.pid

[osd]
osd_data = {w}/osd/$cluster-$id
keyring = $osd_data/keyring
osd_objectstore = memstore
memstore_device_bytes = {self.memstore_bytes}
admin_socket = {self.run_dir}/$cluster-$name.asok
pid_file = {self.run_dir}/$cluster-$name.pid
"""
        self.conf_path.write_text(conf)

    # ------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Create and start the cluster; return when pool ``rbd`` serves requests."""
        if self._started:
            return
        missing = missing_binaries()
        if missing:
            raise RuntimeError(f"Ceph programs missing: {', '.join(missing)}; {INSTALL_HINT}")
        for d in (self.workdir, self.mon_dir.parent, self.log_dir, self.run_dir,
                  self.workdir / "crash"):
            d.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CEPH_")}
        self.env["CEPH_CONF"] = str(self.conf_path)
        self._started = True
        atexit.register(self.stop)
        deadline = time.monotonic() + self.start_timeout
        try:
            self._start_mon(deadline)
            if self.with_osd:
                self._start_osd(deadline)
        except BaseException:
            self.stop()
            raise

    def _start_mon(self, deadline: float) -> None:
        for attempt in range(3):
            self.mon_addr = ("127.0.0.1", free_port())
            self._write_conf()
            if attempt == 0:
                self._make_keys()
            shutil.rmtree(self.mon_dir, ignore_errors=True)
            self.monmap_path.unlink(missing_ok=True)
            self.run("monmaptool", "--create", "--fsid", self.fsid, "--addv", "a",
                     self.mon_host, "--enable-all-features", "--set-min-mon-release",
                     "pacific", str(self.monmap_path))
            self.run("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(self.monmap_path),
                     "--keyring", str(self.mon_keyring_path))
            self._spawn("mon.a", ["ceph-mon", "-i", "a", "-f"])
            # wait until it answers (or dies, e.g. the port was taken meanwhile)
            while time.monotonic() < deadline:
                proc = self._procs["mon.a"]
                if proc.poll() is not None:
                    break
                cp = self.ceph("mon", "stat", timeout=30, check=False)
                if cp.returncode == 0:
                    return
                time.sleep(0.5)
            else:
                raise self._fail("mon did not answer in time")
            self._procs.pop("mon.a")
        raise self._fail("ceph-mon exited at start three times")

    def _make_keys(self) -> None:
        assert self.keyring_path is not None
        for p in (self.mon_keyring_path, self.keyring_path):
            p.unlink(missing_ok=True)
        self.run("ceph-authtool", "--create-keyring", str(self.mon_keyring_path),
                 "--gen-key", "-n", "mon.", "--cap", "mon", "allow *")
        self.run("ceph-authtool", "--create-keyring", str(self.keyring_path), "--gen-key",
                 "-n", "client.admin", "--cap", "mon", "allow *", "--cap", "osd", "allow *",
                 "--cap", "mgr", "allow *", "--cap", "mds", "allow *")
        self.run("ceph-authtool", str(self.mon_keyring_path), "--import-keyring",
                 str(self.keyring_path))

    def _start_osd(self, deadline: float) -> None:
        self.osd_dir.mkdir(parents=True, exist_ok=True)
        secret = self.run("ceph-authtool", "--gen-print-key").stdout.strip()
        (self.osd_dir / "keyring").write_text(f"[osd.0]\n\tkey = {secret}\n")
        secrets = self.workdir / "osd-secrets.json"
        secrets.write_text(json.dumps({"cephx_secret": secret}))
        osd_id = self.ceph("osd", "new", self.osd_uuid, "0", "-i", str(secrets)).stdout.strip()
        if osd_id != "0":
            raise self._fail(f"ceph osd new returned id {osd_id!r}, expected 0")
        self.run("ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", self.osd_uuid, timeout=120)
        self._spawn("osd.0", ["ceph-osd", "-i", "0", "-f"])
        self.ceph("osd", "pool", "create", "rbd", "8", "8")
        self.ceph("osd", "pool", "application", "enable", "rbd", "rbd")
        # ready when a stat of a missing object answers ENOENT
        last = ""
        while True:
            self._check_alive("mon.a")
            self._check_alive("osd.0")
            cp = self.run("rados", "--rados-osd-op-timeout", "10", "--client-mount-timeout",
                          "10", "-p", "rbd", "stat", "x", timeout=40, check=False)
            last = (cp.stderr + cp.stdout).strip()
            if cp.returncode != 0 and ("(2)" in last or "No such file" in last):
                break
            if "unrecognized" in last or "usage" in last:
                raise self._fail(f"rados stat failed: {last}")
            if time.monotonic() > deadline:
                raise self._fail(f"pool rbd not ready after {self.start_timeout} s: {last}")
            time.sleep(0.5)
        self.osd_addr = self._read_osd_addr()

    def _read_osd_addr(self) -> tuple[str, int] | None:
        dump = json.loads(self.ceph("osd", "dump", "--format", "json").stdout)
        for osd in dump.get("osds", []):
            if osd.get("osd") != 0:
                continue
            for av in osd.get("public_addrs", {}).get("addrvec", []):
                if av.get("type") == "v2":
                    host, _, port = av["addr"].rpartition(":")
                    return (host, int(port))
        return None

    def stop(self) -> None:
        """Stop the daemons (SIGTERM, then SIGKILL after 10 s) and wait for them."""
        procs = list(self._procs.items())
        self._procs.clear()
        for _name, proc in reversed(procs):  # osd first, then mon
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for _name, proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=10)
        if self._started:
            with contextlib.suppress(Exception):
                atexit.unregister(self.stop)
        self._started = False

    @property
    def running(self) -> bool:
        return bool(self._procs) and all(p.poll() is None for p in self._procs.values())

    def __enter__(self) -> CephCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (f"CephCluster(workdir={str(self.workdir)!r}, auth={self.auth!r}, "
                f"mon={self.mon_host}, osd={self.osd_addr})")
