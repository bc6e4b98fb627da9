"""`lavi-label submit --address http://HEAD:8265 INPUT... --out URI [run options]`: a run as a Ray job.

The job's entrypoint is `<python> -m jobs.cli run ... --address auto`: the same options, forwarded
one by one from `lavi-label run`'s own parameters (a new run option needs no change here), run by a
driver that joins the cluster it runs on. Its runtime environment carries the project code (the
repository without data, virtualenvs, caches, runs/ and .git) and the model when it is local.

One output, one job at a time: the submission id is derived from the output URI
(`lavi-<12 hex>`, or `--submission-id`). If a job under that id is pending or running, submit
says so and starts nothing (with --wait it follows that job). If it ended (killed, stopped,
failed, or done), submit starts a new job under the next suffix (`<id>-2`, `-3`, ...), and the
pipeline's resume skips the items already committed in the output: nothing runs twice.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from jobs.probe import probe_interpreter
from jobs.ray_auth import ADDRESS_ENV, cli_errors, job_client, load_token, normalize_address, redact, submit_job
from jobs.run import run as run_command

REPO_ROOT = Path(__file__).resolve().parents[1]
# not shipped to the cluster: anywhere in the tree / only at the top of the repository
EXCLUDE_ANYWHERE = (".git", ".venv", "venv", "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache",
                    ".mypy_cache", "*.egg-info", ".cache", ".ipynb_checkpoints")
EXCLUDE_TOP = ("data", "runs", "build", "dist", "demo-out", ".whl", ".device")
MODEL_DIR = "_model"  # where a local --model travels inside the job's working_dir
MAX_PACKAGE_BYTES = 400 * 2**20  # Ray refuses working_dir packages over its gRPC limit (512 MiB)
SECRET_WORDS = ("secret", "key", "token", "password", "credential", "session")


def derived_submission_id(out: str) -> str:
    """The stable submission id of an output URI: `lavi-` + 12 hex of its sha1."""
    return "lavi-" + hashlib.sha1(out.rstrip("/").encode()).hexdigest()[:12]


def absolute_uri(uri: str) -> str:
    """A local path made absolute (a job runs elsewhere, in another directory); URIs unchanged."""
    from pipeline.storage import is_local

    if not is_local(uri) or uri.startswith("file://"):
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def run_arguments(inputs: tuple[str, ...], options: dict[str, Any]) -> list[str]:
    """`lavi-label run` arguments for these option values, every one spelled out (None and off flags left out).

    Explicit values make the job's entrypoint a complete record of its settings, whatever
    defaults the cluster's copy of the code has."""
    args = list(inputs)
    for param in run_command.params:
        if not isinstance(param, click.Option) or param.name == "address" or param.name not in options:
            continue
        value = options[param.name]
        if value is False and param.secondary_opts:  # an on/off pair, turned off: --no-...
            args.append(param.secondary_opts[0])
            continue
        if value is None or value is False or (param.multiple and not value):
            continue
        flag = next(o for o in param.opts if o.startswith("--"))
        if param.is_flag:
            args.append(flag)
        elif param.multiple:
            for v in value:
                args += [flag, str(v)]
        else:
            args += [flag, str(value)]
    return args


def redact_command(command: str) -> str:
    """An entrypoint for display: values of secret-looking --storage-option keys hidden."""
    try:
        words = shlex.split(command)
    except ValueError:  # not a shell line we wrote
        return command
    for i in range(1, len(words)):
        if words[i - 1] == "--storage-option":
            key, sep, _ = words[i].partition("=")
            if sep and any(w in key.lower() for w in SECRET_WORDS):
                words[i] = f"{key}=<redacted>"
    return shlex.join(words)


def _ignore(root: Path):
    anywhere = shutil.ignore_patterns(*EXCLUDE_ANYWHERE)

    def ignore(directory: str, names: list[str]) -> set[str]:
        skip = set(anywhere(directory, names))
        if Path(directory) == root:
            skip |= {n for n in names if n in EXCLUDE_TOP}
        return skip

    return ignore


def stage_working_dir(model: str | None) -> tuple[str, str | None]:
    """A temporary copy of the project code (and of a local model, under _model/): (dir, model arg).

    The model argument is relative to the job's working directory, which Ray makes the current
    directory of the driver and of every worker on every node."""
    from pipeline.storage import is_local

    staging = Path(tempfile.mkdtemp(prefix="lavi-submit-"))
    package = staging / "pkg"
    shutil.copytree(REPO_ROOT, package, ignore=_ignore(REPO_ROOT), symlinks=False)
    model_arg = model
    if model is None:  # the bundled model: the driver's absolute path would name its own node's copy
        from lavi.bundled import DEFAULT_MODEL

        model = DEFAULT_MODEL
    if is_local(model):
        source = Path(model.removeprefix("file://")).expanduser().resolve()
        if not (source / "config.json").is_file():
            shutil.rmtree(staging, ignore_errors=True)
            raise click.UsageError(f"--model {model}: not a checkpoint directory (no config.json)")
        shipped = package / source.relative_to(REPO_ROOT) if source.is_relative_to(REPO_ROOT) else None
        if shipped is not None and (shipped / "config.json").is_file():
            model_arg = str(shipped.relative_to(package))  # inside the code already
        else:
            target = package / MODEL_DIR / (source.name or "model")
            shutil.copytree(source, target)
            model_arg = str(target.relative_to(package))
    size = sum(f.stat().st_size for f in package.rglob("*") if f.is_file())
    if size > MAX_PACKAGE_BYTES:
        shutil.rmtree(staging, ignore_errors=True)
        raise click.UsageError(f"code + model are {size / 2**20:.0f} MiB, over what Ray's working_dir carries "
                               f"({MAX_PACKAGE_BYTES / 2**20:.0f} MiB): put the model on object storage "
                               "(--model s3://...) so every node downloads it")
    return str(package), model_arg


def pick_submission_id(client, base: str):
    """(id to submit under, None), or (None, the JobDetails of a pending/running job for this output)."""
    jobs = [j for j in client.list_jobs() if j.submission_id and
            (j.submission_id == base or (j.submission_id.startswith(f"{base}-")
                                         and j.submission_id[len(base) + 1:].isdigit()))]
    active = [j for j in jobs if not j.status.is_terminal()]
    if active:
        return None, active[0]
    taken = {j.submission_id for j in jobs}
    if base not in taken:
        return base, None
    n = next(n for n in itertools.count(2) if f"{base}-{n}" not in taken)
    return f"{base}-{n}", None


def cluster_gpus(address: str, token: str | None) -> float | None:
    """Total GPUs of the cluster's alive nodes now (None when the state API does not answer)."""
    import requests

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = requests.get(f"{address}/api/v0/nodes?limit=10000&detail=true", headers=headers, timeout=30)
        r.raise_for_status()
        nodes = r.json()["data"]["result"]["result"]
    except (requests.RequestException, KeyError, ValueError):
        return None
    return sum(n.get("resources_total", {}).get("GPU", 0.0) for n in nodes if n.get("state") == "ALIVE")


def follow(client, job_id: str, token: str | None) -> str:
    """Print the job's logs until it ends; returns its final status (a JobStatus value string)."""
    import asyncio

    import aiohttp

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            click.echo(redact(chunk, token), nl=False)

    try:
        with cli_errors(token, client.get_address()):
            try:
                asyncio.run(tail())
            except (OSError, asyncio.TimeoutError, aiohttp.ClientError) as err:  # the stream dropped: poll instead
                click.echo(f"(log stream ended: {type(err).__name__}; waiting for the job to end)", err=True)
            while not (info := client.get_job_info(job_id)).status.is_terminal():
                time.sleep(2)
    except KeyboardInterrupt:
        click.echo(f"\nstopped following; job {job_id} keeps running (lavi-label stop {job_id} stops it)", err=True)
        sys.exit(130)
    return str(info.status.value)


def follow_to_end(client, job_id: str, token: str | None) -> None:
    """Follow the job's logs until it ends, print how it ended, and exit 0 only if it SUCCEEDED."""
    follow(client, job_id, token)
    with cli_errors(token, client.get_address()):
        info = client.get_job_info(job_id)
    status = info.status.value
    if status == "SUCCEEDED":
        click.echo(f"job {job_id} SUCCEEDED")
        return
    lines = [ln for ln in (info.message or "").splitlines() if ln.strip()]
    detail = lines[0] if lines else ""
    if len(lines) > 1:
        detail += f" ... {lines[-1].strip()}"
    click.echo(redact(f"job {job_id} {status}: {detail}", token), err=True)
    sys.exit(1)


def _print_next_steps(job_id: str, address: str) -> None:
    click.echo(f"  follow: lavi-label logs {job_id} --follow --address {address}\n"
               f"  status: lavi-label status {job_id} --address {address}\n"
               f"  stop:   lavi-label stop {job_id} --address {address}")


@click.command("submit")
@click.option("--address", envvar=ADDRESS_ENV, required=True,
              help=f"The head's Jobs API (dashboard) URL, e.g. http://HEAD:8265 (or ${ADDRESS_ENV}).")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help="File holding the cluster's auth token (default: $RAY_AUTH_TOKEN). Never printed.")
@click.option("--submission-id", default=None,
              help="Job id (default: derived from --out, so resubmitting resumes that output).")
@click.option("--wait", is_flag=True, help="Follow the logs until the job ends; exit 0 only if it SUCCEEDED.")
@click.option("--python", "python", default="python", show_default=True,
              help="Interpreter on the cluster's nodes (resolved through the head's PATH); a probe job checks that it "
                   "can import lavi-label before the run is submitted.")
def submit(address: str, token_file: str | None, submission_id: str | None, wait: bool, python: str,
           inputs: tuple[str, ...], **run_options) -> None:
    """Run a labeling job on a Ray cluster (same options as `run`). Resubmitting resumes its output.

    INPUT, --out and --model are read by the cluster's nodes: use object storage or paths every
    node shares; a local --model directory is uploaded with the job."""
    from pipeline.config import RunConfig

    address = normalize_address(address)
    token = load_token(token_file)
    inputs = tuple(absolute_uri(i) for i in inputs)
    run_options["out"] = absolute_uri(run_options["out"])
    try:
        # the same checks as `run`, before anything is sent (--report is the command's, not the pipeline's)
        config = RunConfig(inputs=inputs, **{k: v for k, v in run_options.items() if k != "report"})
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    base = submission_id or derived_submission_id(config.out)
    client = job_client(address, token)
    with cli_errors(token, address):
        job_id, active = pick_submission_id(client, base)
    if active is not None:
        click.echo(f"job {active.submission_id} is already {active.status.value} for {config.out}: "
                   "not starting another")
        _print_next_steps(active.submission_id, address)
        if wait:
            follow_to_end(client, active.submission_id, token)
        return
    if config.gpus_per_worker > 0:
        gpus = cluster_gpus(address, token)
        want = config.workers * config.gpus_per_worker
        if gpus is not None and gpus < want:  # `run` refuses this too (pipeline.recovery.check_resources)
            raise click.UsageError(f"--workers {config.workers} x --gpus-per-worker {config.gpus_per_worker:g} = "
                                   f"{want:g} GPUs; the cluster has {gpus:g}: lower them, or add GPU nodes first")
    working_dir, model_arg = stage_working_dir(config.model)
    try:
        run_options["model"] = model_arg
        args = run_arguments(inputs, run_options)
        entrypoint = shlex.join([python, "-m", "jobs.cli", "run", *args, "--address", "auto"])
        runtime_env = {"working_dir": working_dir, "env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}}
        with cli_errors(token, address):
            probe_interpreter(client, python, runtime_env, job_id)
            submit_job(client, entrypoint=entrypoint, submission_id=job_id, runtime_env=runtime_env,
                       metadata={"lavi_out": config.out, "lavi_base_id": base})
    finally:
        shutil.rmtree(Path(working_dir).parent, ignore_errors=True)
    click.echo(f"submitted {job_id} to {address} (output {config.out})")
    click.echo(f"  entrypoint: {redact(redact_command(entrypoint), token)}")
    _print_next_steps(job_id, address)
    if wait:
        follow_to_end(client, job_id, token)


# every `run` option except --address (here: the Jobs API), after submit's own
submit.params.extend(p for p in run_command.params if p.name != "address")
