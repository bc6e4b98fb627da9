"""`python -m jobs.probe`: can this interpreter run lavi-label? `submit` runs it on the cluster first
(`probe_interpreter`, the driver's side: a job of its own, read back, refused with a message a person can act on).

Standard library only at import and until the checks (the interpreter it runs on may have nothing else): it prints one JSON line, {"ok": true, "python", "version"} or
{"ok": false, "python", "missing", "error"}, and exits 0, or 3 when a module lavi-label needs cannot be imported.
"""

from __future__ import annotations

import importlib
import json
import logging
import secrets
import shlex
import sys
import time

# what the driver of a run imports, in the order a missing one is most likely (the heavy ones last)
MODULES = ("click", "numpy", "pyarrow", "fsspec", "PIL", "ray", "ray.data", "safetensors", "tokenizers", "torch",
           "transformers", "jobs.cli")
MARK = "lavi-label probe: "
log = logging.getLogger(__name__)


def probe() -> dict:
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - any failure to import is the answer
            return {"ok": False, "python": sys.executable, "missing": name, "error": f"{type(err).__name__}: {err}"}
    return {"ok": True, "python": sys.executable, "version": sys.version.split()[0]}


def probe_interpreter(client, python: str, runtime_env: dict, job_id: str, timeout_s: float = 180.0) -> None:
    """Run `python -m jobs.probe` on the cluster as a job of its own (seconds) and raise a UsageError naming the
    interpreter and the missing module when the project cannot run there; the probe job is deleted after."""
    import click

    from jobs.ray_auth import submit_job  # not at import: this module runs on bare interpreters (see above)

    probe_id = f"{job_id}-probe-{secrets.token_hex(3)}"
    submit_job(client, entrypoint=shlex.join([python, "-m", "jobs.probe"]), submission_id=probe_id,
               runtime_env=runtime_env, metadata={"lavi_probe": "1"})
    deadline = time.monotonic() + timeout_s
    while not (info := client.get_job_info(probe_id)).status.is_terminal():
        if time.monotonic() > deadline:
            client.stop_job(probe_id)
            raise click.UsageError(f"the cluster did not run a {timeout_s:.0f} s probe of --python {python!r} "
                                   "(is it short of CPUs?)")
        time.sleep(0.5)
    logs = client.get_job_logs(probe_id)
    try:  # `lavi-label list` hides probe jobs whatever is left of them (jobs.manage.is_probe)
        client.delete_job(probe_id)
    except Exception as err:  # noqa: BLE001 - cleanup only
        log.debug("deleting probe job %s: %s", probe_id, err)
    line = next((ln[len(MARK):] for ln in logs.splitlines() if ln.startswith(MARK)), None)
    if line is not None:
        result = json.loads(line)
        if result["ok"]:
            log.info("the cluster runs lavi-label with %s (Python %s)", result["python"], result["version"])
            return
        raise click.UsageError(
            f"the cluster's interpreter {result['python']} (--python {python}) cannot import {result['missing']!r} "
            f"({result['error']}): install lavi-label's dependencies there (pip install lavi-label), or pass "
            "--python with the path of an interpreter that has them")
    tail = " ".join(logs.strip().splitlines()[-2:])[-300:]
    raise click.UsageError(f"--python {python!r} did not start on the cluster ({info.status.value}"
                           f"{': ' + tail if tail else ''}): pass --python with the path of an interpreter on the "
                           "cluster's nodes that has lavi-label's dependencies")


if __name__ == "__main__":
    result = probe()
    print(MARK + json.dumps(result), flush=True)
    sys.exit(0 if result["ok"] else 3)
