"""Run a function in a long-lived child process, so a hang or a crash costs one call.

decord is reported to hang and segfault on files in the wild. The child is a fresh
interpreter (`python -c ...` via subprocess: no fork, since Ray workers are threaded, and
unlike multiprocessing's spawn it never re-imports the parent's __main__), reused across
calls, killed on timeout and restarted on the next call after it dies. Messages are
pickles over a socketpair; functions travel by reference, so they must be importable
module-level functions (the child gets the parent's sys.path).
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection


log = logging.getLogger(__name__)


class IsolationError(Exception):
    """The isolated call did not return: it timed out, or the child died."""


def _child_main(fd: int, preload: tuple[str, ...] = ()) -> None:
    """Child: import `preload`, say ready, then loop: receive (fn, args), send ("ok", result)
    or ("raise", exception)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    conn = Connection(fd)
    for name in preload:  # heavy imports before the first timed call, not inside it
        try:
            importlib.import_module(name)
        except ImportError as err:
            log.warning("isolated child: cannot preload %s: %s", name, err)
    conn.send(("ready", None))
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):  # the parent is gone
            return
        try:
            fn, args = pickle.loads(message)
            reply = ("ok", fn(*args))
        except Exception as err:  # sent back and re-raised in the parent, unchanged
            reply = ("raise", err)
        try:
            conn.send(reply)
        except Exception as err:  # unpicklable result or exception
            conn.send(("raise", RuntimeError(f"isolated call returned an unpicklable value: {err!r}")))


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(code).name
    except ValueError:
        return "unknown"


class IsolatedRunner:
    """One child process reused across calls; thread-safe (calls are serialised).

    The child is replaced after `max_calls` calls (None: never), bounding what a leaky
    decoder library can accumulate; a restart costs one interpreter start (~0.3-0.8 s).
    """

    def __init__(self, max_calls: int | None = 5000, preload: tuple[str, ...] = (), start_timeout_s: float = 120.0):
        self.preload = tuple(preload)  # modules the child imports before its first call
        self.start_timeout_s = start_timeout_s
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self.max_calls = max_calls
        self.starts = 0  # how many children were started (1 + restarts)
        self._calls = 0  # calls served by the current child

    def _start(self) -> None:
        parent, child = socket.socketpair()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        code = f"from workers.isolate import _child_main; _child_main({child.fileno()}, {self.preload!r})"
        self._proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=[child.fileno()],
                                      stdin=subprocess.DEVNULL, env=env)
        child.close()
        self._conn = Connection(parent.detach())
        self.starts += 1
        self._calls = 0
        try:  # the start is not charged to the first call's timeout
            if self._conn.poll(self.start_timeout_s) and self._conn.recv()[0] == "ready":
                return
        except (EOFError, OSError):
            pass
        exit_code = self._reap(kill=True)
        raise RuntimeError(f"the isolated decoder process failed to start (exit code {exit_code}); see its stderr")

    def _reap(self, kill: bool) -> int | None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if conn is not None:
            conn.close()  # the child's recv sees EOF and it exits
        if proc is None:
            return None
        if kill and proc.poll() is None:
            proc.kill()
        try:
            return proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def call(self, fn, *args, timeout_s: float):
        """fn(*args) in the child. Exceptions from fn re-raise here as they are;
        IsolationError if it takes over timeout_s seconds or the child dies."""
        message = pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL)  # programmer errors raise here
        with self._lock:
            if self._proc is None or self._proc.poll() is not None or (
                    self.max_calls is not None and self._calls >= self.max_calls):
                self._reap(kill=True)
                self._start()
            self._calls += 1
            try:
                self._conn.send_bytes(message)
                ready = self._conn.poll(timeout_s)
            except (BrokenPipeError, ConnectionResetError, EOFError):  # died between calls
                ready = True
            if not ready:
                self._reap(kill=True)
                raise IsolationError(f"decoder timed out after {timeout_s:g} s")
            try:
                kind, value = self._conn.recv()
            except (EOFError, ConnectionResetError, OSError):
                code = self._reap(kill=False)
                raise IsolationError(self._died_message(code)) from None
        if kind == "raise":
            raise value
        return value

    @staticmethod
    def _died_message(code: int | None) -> str:
        if code is not None and code < 0:
            return f"decoder crashed (signal {-code}, {_signal_name(-code)})"
        return f"decoder exited unexpectedly (exit code {code})"

    def close(self) -> None:
        with self._lock:
            self._reap(kill=True)


_RUNNER: IsolatedRunner | None = None
_RUNNER_LOCK = threading.Lock()


def default_runner() -> IsolatedRunner:
    """The process-wide runner (one child per worker process)."""
    global _RUNNER
    with _RUNNER_LOCK:
        if _RUNNER is None:
            _RUNNER = IsolatedRunner(preload=("workers.decode", "workers.probe", "workers.seek", "decord", "av"))
        return _RUNNER


def run_isolated(fn, *args, timeout_s: float):
    """fn(*args) in this process's long-lived decoder child; fn and args must pickle
    (fn a module-level function). Raises IsolationError on a timeout or a crash;
    exceptions raised by fn re-raise unchanged."""
    return default_runner().call(fn, *args, timeout_s=timeout_s)


def guarded(fn, *args, settings):
    """fn(*args) as the decode stages call it: in this process's isolated child when settings.isolate (a
    workers.settings.DecodeSettings), with settings.timeout_s. Not retried here: each of fn's reads is, on
    transient errors (workers.stream), so a FetchError from fn is one whose retries ran out. Raises FetchError,
    IsolationError, or what fn raises."""
    if not settings.isolate:
        return fn(*args)
    return run_isolated(fn, *args, timeout_s=settings.timeout_s)
