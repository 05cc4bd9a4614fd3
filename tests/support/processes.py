"""Start the programs tests and benchmarks drive (``pynbd serve`` and friends, and the
peers they talk to) as background processes; wait until they are ready; stop them for
sure.

A :class:`Process` keeps the program's stdout and stderr in files (unlinked temporary
files, or ``NAME.out``/``NAME.err`` in a directory you name), so a chatty program never
blocks on a full pipe, the output is complete once the program has exited, and children
that inherit the files hold nothing up. Every wait is bounded; :meth:`Process.stop` sends
SIGTERM, waits, then SIGKILLs.

    srv = Process(pynbd_argv("serve", "--port", "0", "memory:1M"), name="serve")
    uri = srv.first_line()          # pynbd serve prints its URI(s) on stdout
    ...
    assert srv.stop() == 0, srv.stderr

One-shot runs of the CLI: :func:`run_pynbd`. The checkout's ``src`` comes first on
PYTHONPATH (:func:`pynbd_env`), so the code under test is this tree's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[2]
#: seconds a process gets to exit after SIGTERM before SIGKILL (and again after it)
STOP_TIMEOUT = 10.0
#: seconds to wait for a process to become ready
START_TIMEOUT = 20.0


def pynbd_python() -> str:
    """The interpreter that runs pynbd: the checkout's .venv if there is one."""
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def pynbd_env(extra: Mapping[str, str] | None = None, *,
              pythonpath: Sequence[str | os.PathLike[str]] = ()) -> dict[str, str]:
    """This environment with ``REPO/src`` (then ``pythonpath``) first on PYTHONPATH,
    updated with ``extra``. Read at call time (tests may monkeypatch os.environ)."""
    env = dict(os.environ)
    parts = [str(REPO / "src"), *map(str, pythonpath)]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    if extra:
        env.update(extra)
    return env


def pynbd_argv(*args: str, python: str | None = None) -> list[str]:
    """``python -m pynbd ARGS...``."""
    return [python or pynbd_python(), "-m", "pynbd", *args]


def run_pynbd(*args: str, timeout: float = 120.0, input: bytes | str | None = None,
              text: bool = False, cwd: str | os.PathLike[str] | None = None,
              env: Mapping[str, str] | None = None,
              python: str | None = None) -> subprocess.CompletedProcess[Any]:
    """Run ``pynbd ARGS...`` to completion (bounded), output captured; ``env`` is the
    whole environment (default :func:`pynbd_env`). The caller checks the exit status."""
    return subprocess.run(pynbd_argv(*args, python=python), input=input,
                          stdin=subprocess.DEVNULL if input is None else None,
                          capture_output=True, text=text, timeout=timeout, cwd=cwd,
                          env=dict(env) if env is not None else pynbd_env(), check=False)


def stop_process(proc: subprocess.Popen[Any], timeout: float = STOP_TIMEOUT,
                 sig: int = signal.SIGTERM) -> int | None:
    """Stop ``proc`` for sure: ``sig`` (SIGTERM), up to ``timeout`` seconds, then
    SIGKILL; its exit status (None only if even SIGKILL did not reap it in time)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
    return proc.returncode


def wait_until(pred: Callable[[], object], timeout: float = 10.0,
               interval: float = 0.02) -> bool:
    """Poll ``pred`` until it is true or ``timeout`` passes (bounded); the last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


def _read_all(f: IO[bytes]) -> bytes:
    """Everything written to ``f`` so far (pread: the writer's offset stays put)."""
    fd = f.fileno()
    size = os.fstat(fd).st_size
    chunks = []
    pos = 0
    while pos < size:
        chunk = os.pread(fd, size - pos, pos)
        if not chunk:
            break
        chunks.append(chunk)
        pos += len(chunk)
    return b"".join(chunks)


class Process:
    """A background process (``argv``) with its output captured in files.

    ``env`` is the whole environment (default :func:`pynbd_env`); ``log_dir`` keeps the
    output as ``NAME.out``/``NAME.err`` there (``NAME-2.out`` and so on when another
    process has the name: never overwritten), by default unlinked temporary files;
    ``new_session`` starts it in its own session (a signal to the test's process group
    does not reach it); ``pass_fds`` are inherited (a listening socket).
    """

    def __init__(self, argv: Sequence[str], *, name: str | None = None,
                 cwd: str | os.PathLike[str] | None = None,
                 env: Mapping[str, str] | None = None, log_dir: Path | None = None,
                 new_session: bool = False, pass_fds: Sequence[int] = (),
                 stop_timeout: float = STOP_TIMEOUT) -> None:
        self.argv = list(argv)
        self.name = name or Path(self.argv[0]).name
        self.stop_timeout = stop_timeout
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            stem = self.name
            for i in range(2, 1000):  # another process's output is never overwritten
                if not (log_dir / f"{stem}.out").exists():
                    break
                stem = f"{self.name}-{i}"
            self._out: IO[bytes] = open(log_dir / f"{stem}.out", "w+b")
            self._err: IO[bytes] = open(log_dir / f"{stem}.err", "w+b")
        else:
            self._out = tempfile.TemporaryFile()
            self._err = tempfile.TemporaryFile()
        try:
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err,
                cwd=cwd, env=dict(env) if env is not None else pynbd_env(),
                start_new_session=new_session, pass_fds=tuple(pass_fds))
        except BaseException:
            self._out.close()
            self._err.close()
            raise

    # --- state and output ---------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def stdout(self) -> str:
        return _read_all(self._out).decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return _read_all(self._err).decode("utf-8", "replace")

    @property
    def output(self) -> str:
        """stdout, then stderr."""
        return self.stdout + self.stderr

    def lines(self) -> list[str]:
        """The complete lines on stdout so far (all of them once it has exited)."""
        text = self.stdout
        done = self.proc.poll() is not None
        parts = text.split("\n")
        if not done or not parts[-1]:
            parts.pop()  # an unfinished line, or the empty rest after the last newline
        return parts

    def logs(self, tail: int = 4000) -> str:
        """The end of stdout and of stderr, for an error message."""
        return f"{self.stdout[-tail:]}{self.stderr[-tail:]}"

    # --- waiting ----------------------------------------------------------------------

    def wait_for(self, cond: Callable[[], object], what: str,
                 timeout: float = START_TIMEOUT) -> None:
        """Poll ``cond`` until it holds; RuntimeError (with the output) if the process
        exits first or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            if self.proc.poll() is not None:
                if cond():
                    return
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) before "
                                   f"{what}:\n{self.logs()}")
            time.sleep(0.02)
        if cond():
            return
        raise RuntimeError(f"{self.name}: no {what} within {timeout}s:\n{self.logs()}")

    def wait_line(self, pred: Callable[[str], bool] = bool, what: str = "output line",
                  timeout: float = START_TIMEOUT) -> str:
        """The first stdout line for which ``pred`` holds (default: a non-empty one)."""
        found: list[str] = []

        def seen() -> bool:
            found[:] = [x for x in self.lines() if pred(x)][:1]
            return bool(found)

        self.wait_for(seen, what, timeout)
        return found[0]

    def first_line(self, timeout: float = START_TIMEOUT) -> str:
        """The first line on stdout (``pynbd serve``/``listen``: the URI)."""
        self.wait_for(lambda: bool(self.lines()), "output line", timeout)
        return self.lines()[0]

    def wait(self, timeout: float | None = STOP_TIMEOUT) -> int:
        """Wait for the exit (``subprocess.TimeoutExpired`` after ``timeout``)."""
        return self.proc.wait(timeout)

    # --- stopping ---------------------------------------------------------------------

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` if it is still running."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, wait, SIGKILL: stopped and reaped for sure; the exit status."""
        return stop_process(self.proc, self.stop_timeout if timeout is None else timeout)

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:  # quietly: the files of a process nobody closed
        for f in (getattr(self, "_out", None), getattr(self, "_err", None)):
            if f is not None:
                with contextlib.suppress(Exception):
                    f.close()
