"""`lavi-label status|logs|stop|list`: thin, readable views over the Ray Jobs API.

Every command takes --address (or $RAY_API_SERVER_ADDRESS) and the token as `submit` does.
Secret-looking --storage-option values are hidden in the entrypoints shown.
"""

from __future__ import annotations

import datetime
import re
import time

import click

from jobs.ray_auth import ADDRESS_ENV, cli_errors, job_client, load_token, normalize_address, redact
from jobs.submit import follow, redact_command


def cluster_options(f):
    f = click.option("--token-file", type=click.Path(dir_okay=False), default=None,
                     help="File holding the cluster's auth token (default: $RAY_AUTH_TOKEN). Never printed.")(f)
    return click.option("--address", envvar=ADDRESS_ENV, required=True,
                        help=f"The head's Jobs API (dashboard) URL, e.g. http://HEAD:8265 (or ${ADDRESS_ENV}).")(f)


def _client(address: str, token_file: str | None):
    token = load_token(token_file)
    address = normalize_address(address)
    return job_client(address, token), token, address


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(start_ms: int | None, end_ms: int | None) -> str:
    if not start_ms:
        return "-"
    seconds = int(((end_ms or time.time() * 1000) - start_ms) / 1000)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


@click.command("status")
@click.argument("job")
@cluster_options
def status(job: str, address: str, token_file: str | None) -> None:
    """Show a job's status, output, times and last message."""
    client, token, address = _client(address, token_file)
    with cli_errors(token, address):
        info = client.get_job_info(job)
    meta = info.metadata or {}
    lines = [("job", info.submission_id or job), ("status", info.status.value),
             ("output", meta.get("lavi_out", "-")),
             ("started", _when(info.start_time)), ("ended", _when(info.end_time)),
             ("duration", _duration(info.start_time, info.end_time)),
             ("entrypoint", redact_command(info.entrypoint))]
    if info.message:
        message = info.message.strip().splitlines()
        lines.append(("message", message[0] + (f" ... {message[-1].strip()}" if len(message) > 1 else "")))
    for key, value in lines:
        click.echo(redact(f"{key + ':':<11} {value}", token))


@click.command("logs")
@click.argument("job")
@click.option("--follow", "-f", "follow_", is_flag=True, help="Keep printing new lines until the job ends.")
@cluster_options
def logs(job: str, follow_: bool, address: str, token_file: str | None) -> None:
    """Print a job's driver logs (progress, summary, errors)."""
    client, token, address = _client(address, token_file)
    if follow_:
        follow(client, job, token)
        return
    with cli_errors(token, address):
        click.echo(redact(client.get_job_logs(job), token), nl=False)


@click.command("stop")
@click.argument("job")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for the job to end.")
@cluster_options
def stop(job: str, timeout: float, address: str, token_file: str | None) -> None:
    """Stop a job and wait until it has ended. Resubmitting the same output later resumes it."""
    client, token, address = _client(address, token_file)
    with cli_errors(token, address):
        info = client.get_job_info(job)
        if info.status.is_terminal():
            click.echo(f"job {job} already ended: {info.status.value}")
            return
        client.stop_job(job)
        deadline = time.monotonic() + timeout
        while not (info := client.get_job_info(job)).status.is_terminal():
            if time.monotonic() > deadline:
                raise click.ClickException(f"job {job} is still {info.status.value} after {timeout:g}s of stopping")
            time.sleep(1)
    click.echo(f"job {job} {info.status.value}")


def is_probe(job) -> bool:
    """A job of submit's interpreter check (jobs.submit.probe_interpreter): not the user's."""
    return "lavi_probe" in (job.metadata or {}) or bool(re.search(r"-probe-[0-9a-f]{6}$", job.submission_id or ""))


@click.command("list")
@cluster_options
def list_jobs(address: str, token_file: str | None) -> None:
    """List the cluster's jobs, oldest first: id, status, start, duration, output."""
    client, token, address = _client(address, token_file)
    with cli_errors(token, address):
        jobs = [j for j in client.list_jobs() if not is_probe(j)]
    jobs.sort(key=lambda j: j.start_time or 0)
    rows = [(j.submission_id or j.job_id or "-", j.status.value, _when(j.start_time),
             _duration(j.start_time, j.end_time), (j.metadata or {}).get("lavi_out", "-")) for j in jobs]
    header = ("JOB", "STATUS", "STARTED", "DURATION", "OUTPUT")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        click.echo(redact("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4], token))
