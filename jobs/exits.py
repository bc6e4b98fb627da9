"""How the command-line programs end."""
from __future__ import annotations

import click


def exit_hard(command: click.Command) -> None:
    """Run a click command as a program, then end the process with its exit code once stdout, stderr and the logs are
    flushed, skipping the interpreter's finalisation: an Arrow I/O thread that drops the last reference to a Python
    file after finalisation began aborts the process (CI saw a finished `run` exit -6 in place of its 3 once,
    apache/arrow#39862). Ray is shut down by the commands themselves (and its reaper ends a local cluster's
    processes with their driver)."""
    import logging
    import os
    import sys

    try:
        command()
        code = 0
    except SystemExit as err:
        code = err.code
    if code is not None and not isinstance(code, int):  # sys.exit("message"): printed, status 1, as Python does
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code or 0)
