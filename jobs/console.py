"""Ray's native log lines off the terminal of a CLI process.

Ray's core worker in the driver logs through spdlog, which writes every ERROR line to the process's fd 2 as well
as to the Ray session's `python-core-driver-*.log`. One such line comes with every run: Ray Data passes its map
actors' constructor arguments by object reference and starts them with `max_restarts`, and the core worker says
so at E level (ray-project/ray#53727). It is harmless and already in the session's log file.

`native_logs_off_terminal()` makes fd 2 a pipe read by a thread that passes every byte on to the terminal
unchanged except whole lines in Ray's native format (`[2026-12-05 07:54:16,944 E 2990 3243] core_worker.cc:...`)
below FATAL; a fatal line still reaches the terminal. Python's own `sys.stderr` (the progress bar, logging, click)
is pointed straight at the terminal, so a terminal stays a terminal for tqdm. Processes Ray starts from here
write their output to the session's log files, never to this fd 2. Only for a real CLI process: under a test
runner's captured stderr it does nothing.
"""

from __future__ import annotations

import atexit
import io
import logging
import os
import re
import sys
import threading

NATIVE_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWE] \d+ \d+\] [\w./-]+:\d+: ")
_installed = False


def native_logs_off_terminal() -> None:
    """Keep Ray's native (C++) log lines below FATAL off this process's terminal; idempotent."""
    global _installed
    if _installed or sys.stderr is not sys.__stderr__:
        return
    try:
        if sys.stderr.fileno() != 2:
            return
    except (AttributeError, OSError, ValueError):
        return
    _installed = True
    sys.stderr.flush()
    terminal = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    old = sys.stderr
    new = io.TextIOWrapper(io.FileIO(terminal, "w", closefd=False), encoding=old.encoding, errors=old.errors,
                           line_buffering=True)
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", ()):
            if isinstance(handler, logging.StreamHandler) and handler.stream is old:
                handler.setStream(new)
    sys.stderr = new
    thread = threading.Thread(target=_forward, args=(read_end, terminal), name="native-log-filter", daemon=True)
    thread.start()

    def restore() -> None:
        new.flush()
        os.dup2(terminal, 2)  # the pipe's last writer closes: the thread reads what is left, then EOF
        thread.join(timeout=2)

    atexit.register(restore)


def _forward(read_end: int, terminal: int) -> None:
    """Copy the pipe to the terminal, dropping whole native log lines. A partial line is held only while it may
    still become one (it starts with "["), so a prompt or a progress bar without a newline is not delayed."""
    pending = b""
    while chunk := os.read(read_end, 65536):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        out = b"".join(line + b"\n" for line in lines if not NATIVE_LINE.match(line))
        if pending and not pending.startswith(b"["):
            out, pending = out + pending, b""
        if out:
            _write_all(terminal, out)
    if pending and not NATIVE_LINE.match(pending):
        _write_all(terminal, pending)
    os.close(read_end)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def cli_logging(level: int = logging.INFO, verbose: bool = False, fmt: str = LOG_FORMAT) -> None:
    """A command's log lines on stderr; Ray's native ones in the session's logs only, unless `verbose`."""
    logging.basicConfig(level=level, format=fmt)
    if not verbose:
        native_logs_off_terminal()
