"""`lavi-label retry OUT`: relabel the error rows of a finished output in place (pipeline.retry). No logic here."""

from __future__ import annotations

import sys

import click

from jobs.console import cli_logging

from jobs.run import execution_options
from pipeline.retry import RETRY_STAGES


@click.command("retry")
@click.argument("out")
@click.option("--stage", "stages", multiple=True, type=click.Choice(RETRY_STAGES),
              help="Retry only the error rows of this stage (repeatable; default: read, decode and infer).")
@click.option("--model", default=None, help="The checkpoint that labelled OUT (default: the one its run recorded).")
@execution_options
def retry_cmd(out: str, stages: tuple[str, ...], model: str | None, **flags) -> None:
    """Relabel only the error rows of a finished output: each is replaced exactly once, in the file that held it."""
    from pipeline.recovery import PipelineStalled
    from pipeline.retry import retry

    cli_logging(verbose=flags["verbose"])
    try:
        summary = retry(out, stages or RETRY_STAGES, model, **flags)
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    except PipelineStalled as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(4)
    r = summary["retry"]
    new = ", ".join(f"{k} {v}" for k, v in r["new_rows"].items()) or "none"
    left = ", ".join(f"{k} {v}" for k, v in r["not_retried"].items())
    click.echo(f"retried {r['rows']} error rows of {r['items']} items in {r['wall_s']:.1f} s: "
               f"{r['rows_replaced']} replaced in {r['files_rewritten']} files by rows now {new}; "
               f"{r['error_rows_left']} error rows left in {out}" + (f" (not retried: {left})" if left else ""))
